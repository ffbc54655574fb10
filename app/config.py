"""Settings: one pydantic-settings class read from the environment, refusing incoherent setups."""

from __future__ import annotations

import secrets
from enum import StrEnum
from typing import Self

from pydantic import Field, PrivateAttr, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class StorageBackend(StrEnum):
    MEMORY = "memory"
    POSTGRES = "postgres"


class BrokerKind(StrEnum):
    REDIS = "redis"
    FAKEREDIS = "fakeredis"
    STUB = "stub"


class ProcessRole(StrEnum):
    DEV = "dev"  # API + in-process worker + periodic jobs in one process
    API = "api"
    WORKER = "worker"


class Settings(BaseSettings):
    """Every setting of the gateway; field names are the environment variable names."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=True
    )

    ENVIRONMENT: str = "development"
    PROCESS_ROLE: ProcessRole = ProcessRole.DEV
    HOST: str = "127.0.0.1"
    PORT: int = 8000
    LOG_LEVEL: str = "INFO"

    STORAGE_BACKEND: StorageBackend = StorageBackend.MEMORY
    DATABASE_URL: str = "postgresql://postgres@127.0.0.1:5432/gateway"
    DB_POOL_SIZE: int = Field(default=10, ge=1, le=200)
    DB_MAX_OVERFLOW: int = Field(default=10, ge=0, le=200)
    DB_CONNECT_TIMEOUT: float = Field(default=5.0, gt=0)

    REDIS_URL: str = "redis://127.0.0.1:6379/0"
    BROKER: BrokerKind = BrokerKind.FAKEREDIS

    # Encrypts stored provider credentials and webhook secrets. Comma-separate several keys to
    # rotate: the first encrypts, all decrypt.
    SECRET_KEY: SecretStr | None = None

    MAX_REQUEST_BYTES: int = Field(default=10 * 1024 * 1024, ge=1024)

    # An API key with exactly this secret and admin rights is ensured at start-up (compose, CI).
    ADMIN_API_KEY: SecretStr | None = None

    # The job engine.
    JOB_MAX_ATTEMPTS: int = Field(default=3, ge=1, le=100)
    JOB_LEASE_SECONDS: float = Field(default=6.0, gt=0)
    JOB_HEARTBEAT_SECONDS: float | None = Field(default=None, gt=0)
    JOB_RETRY_BASE_SECONDS: float = Field(default=1.0, ge=0)
    JOB_RETRY_MAX_SECONDS: float = Field(default=300.0, ge=0)
    JOB_RESEND_AFTER_SECONDS: float = Field(default=3.0, gt=0)
    JOB_RETENTION_SECONDS: float = Field(default=7 * 24 * 3600.0, gt=0)
    SWEEP_INTERVAL_SECONDS: float = Field(default=1.0, gt=0)
    PURGE_INTERVAL_SECONDS: float = Field(default=300.0, gt=0)
    WORKER_THREADS: int = Field(default=8, ge=1, le=256)
    WORKER_PROCESSES: int = Field(default=1, ge=1, le=64)
    LONG_POLL_MAX_SECONDS: float = Field(default=30.0, ge=0)

    # The built-in mock provider (a model's parameters may override these).
    MOCK_LATENCY_MS: float = Field(default=0.0, ge=0)
    MOCK_FAILURE_RATE: float = Field(default=0.0, ge=0, le=1)

    # Memory storage forgets everything on exit, so a key that dies with the process is enough.
    _ephemeral_key: str = PrivateAttr(default_factory=lambda: secrets.token_urlsafe(32))

    @model_validator(mode="after")
    def _coherent(self) -> Self:
        memory = self.STORAGE_BACKEND is StorageBackend.MEMORY
        if memory and self.PROCESS_ROLE is not ProcessRole.DEV:
            raise ValueError(
                f"STORAGE_BACKEND=memory keeps data inside one process, so `gateway "
                f"{self.PROCESS_ROLE.value}` cannot share it with the other processes: use "
                "`gateway dev` (API and worker in one process) or set STORAGE_BACKEND=postgres."
            )
        if memory and self.BROKER is BrokerKind.REDIS:
            raise ValueError(
                f"STORAGE_BACKEND=memory with BROKER={self.BROKER.value} would let workers of "
                "other processes receive jobs whose rows they cannot see: set BROKER=fakeredis "
                "(or stub), or set STORAGE_BACKEND=postgres."
            )
        if self.BROKER is BrokerKind.FAKEREDIS and self.PROCESS_ROLE is not ProcessRole.DEV:
            raise ValueError(
                "BROKER=fakeredis lives inside one process, so jobs sent by `gateway "
                f"{self.PROCESS_ROLE.value}` would never reach another process: set BROKER=redis "
                "(with REDIS_URL) or run `gateway dev`."
            )
        if not memory and self.SECRET_KEY is None:
            raise ValueError(
                "STORAGE_BACKEND=postgres stores encrypted secrets that must survive restarts: "
                "set SECRET_KEY to a long random string (e.g. `python -c 'import secrets; "
                "print(secrets.token_urlsafe(32))'`)."
            )
        if not memory and not self.DATABASE_URL.startswith(("postgresql", "postgres://")):
            raise ValueError(
                "DATABASE_URL must be a PostgreSQL URL such as "
                "postgresql://user:password@host:5432/dbname."
            )
        return self

    def secret_keys(self) -> list[str]:
        """The encryption keys, newest first (an ephemeral one when memory storage has none)."""
        if self.SECRET_KEY is None:
            return [self._ephemeral_key]
        return [k.strip() for k in self.SECRET_KEY.get_secret_value().split(",") if k.strip()]
