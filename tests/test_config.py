"""Settings refuse incoherent setups with a sentence that says what to change."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from app.config import BrokerKind, ProcessRole, Settings, StorageBackend

SECRET = "test-secret-key-of-sufficient-length"


@pytest.fixture(autouse=True)
def _no_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env


def test_the_defaults_are_the_embedded_single_process_setup() -> None:
    settings = Settings()
    assert settings.PROCESS_ROLE is ProcessRole.DEV
    assert settings.STORAGE_BACKEND is StorageBackend.MEMORY
    assert settings.BROKER is BrokerKind.FAKEREDIS


@pytest.mark.parametrize(
    ("values", "sentence"),
    [
        pytest.param(
            {"PROCESS_ROLE": "api"},
            "STORAGE_BACKEND=memory keeps data inside one process",
            id="memory-with-api-role",
        ),
        pytest.param(
            {"PROCESS_ROLE": "worker", "BROKER": "redis"},
            "STORAGE_BACKEND=memory keeps data inside one process",
            id="memory-with-worker-role",
        ),
        pytest.param(
            {"BROKER": "redis"},
            "STORAGE_BACKEND=memory with BROKER=redis",
            id="memory-with-redis-broker",
        ),
        pytest.param(
            {"STORAGE_BACKEND": "postgres", "SECRET_KEY": SECRET, "PROCESS_ROLE": "worker"},
            "BROKER=fakeredis lives inside one process",
            id="fakeredis-with-worker-role",
        ),
        pytest.param(
            {"STORAGE_BACKEND": "postgres"},
            "STORAGE_BACKEND=postgres stores encrypted secrets",
            id="postgres-without-secret-key",
        ),
        pytest.param(
            {
                "STORAGE_BACKEND": "postgres",
                "SECRET_KEY": SECRET,
                "DATABASE_URL": "mysql://user@host/db",
            },
            "DATABASE_URL must be a PostgreSQL URL",
            id="non-postgres-database-url",
        ),
        pytest.param(
            {"OUTBOUND_ALLOWED_HOSTS": "10.0.0.0/8,localhost:8000"},
            "'localhost:8000' is not a host name, an address or a CIDR range",
            id="outbound-allowed-host-with-a-port",
        ),
    ],
)
def test_an_incoherent_setup_is_refused_with_its_sentence(
    values: dict[str, Any], sentence: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(**values)
    assert sentence in str(caught.value)


def test_the_environment_is_read_and_refused_the_same_way(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROCESS_ROLE", "api")
    with pytest.raises(ValidationError, match="STORAGE_BACKEND=memory keeps data"):
        Settings()


@pytest.mark.parametrize("url", ["postgresql://user@host/db", "postgres://user:pw@host:5432/db"])
def test_a_postgres_url_is_accepted(url: str) -> None:
    settings = Settings(STORAGE_BACKEND="postgres", SECRET_KEY=SECRET, DATABASE_URL=url)
    assert url == settings.DATABASE_URL


def test_the_distributed_setup_is_accepted() -> None:
    settings = Settings(
        PROCESS_ROLE="api", STORAGE_BACKEND="postgres", SECRET_KEY=SECRET, BROKER="redis"
    )
    assert settings.PROCESS_ROLE is ProcessRole.API


STRONG = "kJ3v9QzR1xW7mN2pL5tY8bC4dF6gH0aS"


@pytest.mark.parametrize(
    ("secret", "reason"),
    [
        pytest.param(None, "is not set", id="missing"),
        pytest.param("short-but-random-9f8e7d", "shorter than 32 characters", id="short"),
        pytest.param("change-me-to-a-long-random-string", "placeholder", id="compose-sample"),
        pytest.param("a" * 40, "placeholder", id="one-character"),
        pytest.param("my-super-secret-production-key-2026", "placeholder", id="a-phrase"),
    ],
)
def test_production_refuses_a_weak_secret_key_saying_how_to_make_one(
    secret: str | None, reason: str
) -> None:
    values: dict[str, Any] = {"ENVIRONMENT": "production"}
    if secret is not None:
        values["SECRET_KEY"] = secret
    with pytest.raises(ValidationError) as caught:
        Settings(**values)
    message = str(caught.value)
    assert "ENVIRONMENT=production needs a strong SECRET_KEY" in message
    assert reason in message
    assert "secrets.token_urlsafe(32)" in message
    if secret is not None:
        assert secret not in message  # the refused value is never echoed


def test_production_accepts_a_random_key_and_an_old_weak_one_behind_it_for_rotation() -> None:
    settings = Settings(ENVIRONMENT="production", SECRET_KEY=f"{STRONG},old-short-key")
    assert settings.secret_keys() == [STRONG, "old-short-key"]


def test_a_weak_secret_key_is_accepted_outside_production() -> None:
    assert Settings(SECRET_KEY="short").secret_keys() == ["short"]


def test_an_empty_admin_api_key_means_none() -> None:
    assert Settings(ADMIN_API_KEY="").ADMIN_API_KEY is None  # type: ignore[arg-type]


def test_a_short_admin_api_key_is_refused_saying_how_to_make_one() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(ADMIN_API_KEY="gw-short")  # type: ignore[arg-type]
    assert "ADMIN_API_KEY must be at least 20 characters" in str(caught.value)
    assert "gw-short" not in str(caught.value)


def test_a_refused_setup_does_not_echo_the_secrets_it_was_given() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(PROCESS_ROLE="api", SECRET_KEY="do-not-print-me-0123456789abcdef")  # type: ignore[arg-type]
    assert "STORAGE_BACKEND=memory" in str(caught.value)
    assert "do-not-print-me" not in str(caught.value)


def test_workers_bound_their_statements_more_loosely_than_the_api() -> None:
    api = Settings(
        PROCESS_ROLE="api", STORAGE_BACKEND="postgres", SECRET_KEY=SECRET, BROKER="redis"
    )  # type: ignore[arg-type]
    worker = Settings(
        PROCESS_ROLE="worker", STORAGE_BACKEND="postgres", SECRET_KEY=SECRET, BROKER="redis"
    )  # type: ignore[arg-type]
    assert api.statement_timeout() == api.DB_STATEMENT_TIMEOUT_SECONDS == 5.0
    assert worker.statement_timeout() == worker.WORKER_DB_STATEMENT_TIMEOUT_SECONDS == 300.0
