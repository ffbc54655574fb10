"""Settings: one pydantic-settings class read from the environment, refusing incoherent setups."""

from __future__ import annotations

import importlib.util
import os
import re
import secrets
import tempfile
from collections.abc import Iterator
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal, Self

from pydantic import Field, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.core.database_url import SCHEMES, parse_database_url
from app.core.egress import ProxyRules
from app.core.outbound import OutboundPolicy

if TYPE_CHECKING:
    from app.core.redis_url import RedisEndpoint


class StorageBackend(StrEnum):
    MEMORY = "memory"
    POSTGRES = "postgres"


class CacheBackendKind(StrEnum):
    NONE = "none"
    MEMORY = "memory"
    REDIS = "redis"


class BrokerKind(StrEnum):
    REDIS = "redis"
    FAKEREDIS = "fakeredis"
    STUB = "stub"


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


class JwtAlgorithm(StrEnum):
    HS256 = "HS256"
    RS256 = "RS256"


class ProcessRole(StrEnum):
    DEV = "dev"  # API + in-process worker + periodic jobs in one process
    API = "api"
    WORKER = "worker"


MIN_SECRET_KEY_LENGTH = 32
MIN_ADMIN_KEY_LENGTH = 20
# Words of the sample values in docs and compose files, never of a generated key.
_PLACEHOLDER_WORDS = ("change", "replace", "placeholder", "example", "secret")


def weak_secret_problem(key: str) -> str | None:
    """Why `key` is too weak to encrypt with (a phrase that follows "it"), or None."""
    if len(key) < MIN_SECRET_KEY_LENGTH:
        return f"is shorter than {MIN_SECRET_KEY_LENGTH} characters"
    lowered = key.lower()
    if any(word in lowered for word in _PLACEHOLDER_WORDS) or len(set(key)) < 12:
        return "looks like a placeholder, not a random string"
    return None


# The settings that are URLs which may carry a password, and the query options whose values are
# passwords (libpq's and redis-py's names).
_URL_FIELDS = frozenset({"DATABASE_URL", "REDIS_URL"})
_PASSWORD_OPTION = re.compile(r"(?i)(^|&)((?:ssl_?)?password)=[^&#]*")
HIDDEN = "***"
_HIDDEN_OPTION = rf"\1\2={HIDDEN}"


def without_passwords(url: str) -> str:
    """`url` with its password, and the value of any password option, shown as `***`.

    Read without a URL parser, so that a password with an unencoded `?`, `#` or `/` is hidden
    whole: everything between the user name and the last `@` goes (more, never less).
    """
    scheme, sep, rest = url.partition("://")
    userinfo, at, after = rest.rpartition("@")
    if sep and at and ":" in userinfo:
        rest = f"{userinfo.partition(':')[0]}:{HIDDEN}@{after}"
    base, mark, query = rest.partition("?")
    if mark:
        rest = f"{base}?{_PASSWORD_OPTION.sub(_HIDDEN_OPTION, query)}"
    return f"{scheme}{sep}{rest}"


class Settings(BaseSettings):
    """Every setting of the gateway; field names are the environment variable names.

    Its `repr` and `str` (a log line, a traceback's locals, a debugger) show DATABASE_URL and
    REDIS_URL without their passwords, and SecretStr fields as `**********`.
    """

    # Inputs are kept out of error messages: a refused DATABASE_URL carries a password.
    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=True,
        # An error's text must not carry the environment it was read from (keys, passwords).
        hide_input_in_errors=True,
    )

    # `production` (the container image's default) refuses a missing, short or placeholder
    # SECRET_KEY at start-up.
    ENVIRONMENT: str = "development"
    PROCESS_ROLE: ProcessRole = ProcessRole.DEV
    HOST: str = "127.0.0.1"
    PORT: int = 8000
    LOG_LEVEL: str = "INFO"
    # `json`: one JSON object per line (API, uvicorn's access log, workers); `text`: for people.
    # Unset: json when ENVIRONMENT=production (a log collector reads it), text otherwise.
    LOG_FORMAT: LogFormat | None = None

    def log_format(self) -> LogFormat:
        """LOG_FORMAT, or the environment's default when it is unset."""
        if self.LOG_FORMAT is not None:
            return self.LOG_FORMAT
        production = self.ENVIRONMENT.strip().lower() == "production"
        return LogFormat.JSON if production else LogFormat.TEXT

    # Prometheus metrics (README "Metrics"). `GET /metrics` on PORT always answers admin keys.
    # METRICS_PORT also serves them without credentials on METRICS_HOST, from the API process
    # (the first free port of METRICS_PORT.. when uvicorn runs several); WORKER_METRICS_PORT
    # gives each worker process a port of its own from it on (up to WORKER_PROCESSES ports).
    METRICS_HOST: str = "127.0.0.1"
    METRICS_PORT: int | None = Field(default=None, ge=1, le=65535)
    WORKER_METRICS_PORT: int | None = Field(default=None, ge=1, le=65535)
    # How old the queue depths a scrape shows may be: one grouped query per this many seconds
    # and API process at most.
    METRICS_QUEUE_REFRESH_SECONDS: float = Field(default=10.0, ge=0)

    # Traces (README "Traces"): set, each process exports its spans over OTLP/HTTP to this base
    # URL (`/v1/traces` is added), which needs the `otel` extra; unset, no span is recorded.
    # OpenTelemetry's other OTEL_* variables (headers, sampler, resource) are read by its SDK.
    OTEL_EXPORTER_OTLP_ENDPOINT: str | None = None
    # Unset: llm-gateway-worker for `gateway worker`, llm-gateway-api for the others.
    OTEL_SERVICE_NAME: str | None = None

    @field_validator("OTEL_EXPORTER_OTLP_ENDPOINT")
    @classmethod
    def _otlp_endpoint(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            return None  # `OTEL_EXPORTER_OTLP_ENDPOINT=` (an empty line in .env): no traces
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(
                "OTEL_EXPORTER_OTLP_ENDPOINT must be the http:// or https:// base URL of an "
                "OTLP/HTTP receiver, e.g. http://otel-collector:4318."
            )
        return value

    def otel_service_name(self) -> str:
        """OTEL_SERVICE_NAME, or this process role's default."""
        if self.OTEL_SERVICE_NAME:
            return self.OTEL_SERVICE_NAME
        worker = self.PROCESS_ROLE is ProcessRole.WORKER
        return "llm-gateway-worker" if worker else "llm-gateway-api"

    STORAGE_BACKEND: StorageBackend = StorageBackend.MEMORY
    # Query options both drivers (asyncpg at run time, psycopg for migrations) honour: sslmode,
    # sslrootcert, sslcert, sslkey, sslpassword, sslcrl, target_session_attrs, application_name,
    # options (`-c name=value` server settings), connect_timeout (replaces DB_CONNECT_TIMEOUT),
    # host, port, dbname, user, password, passfile; any other is refused.
    DATABASE_URL: str = "postgresql://postgres@127.0.0.1:5432/gateway"
    DB_POOL_SIZE: int = Field(default=10, ge=1, le=200)
    DB_MAX_OVERFLOW: int = Field(default=10, ge=0, le=200)
    DB_CONNECT_TIMEOUT: float = Field(default=5.0, gt=0)
    # A connection older than this is closed when it comes back to the pool instead of being
    # reused (0: never), so processes follow a failover or a moved proxy within this time.
    DB_POOL_MAX_LIFETIME_SECONDS: float = Field(default=1800.0, ge=0)
    # asyncpg's cache of prepared statements. Turn it off behind PgBouncer in transaction or
    # statement pooling mode, where the next transaction may run on another server connection
    # that lacks them; every statement then costs one more round trip.
    DB_STATEMENT_CACHE: bool = True
    # The longest a statement of an API process may run: the server cancels it then
    # (`statement_timeout`, unless DATABASE_URL's `options` sets one), and the client gives up a
    # little later on a link that went silent, so a request meets a 503 instead of hanging.
    # Workers take the second, longer bound: retention and roll-ups delete in bulk. 0: no bound.
    DB_STATEMENT_TIMEOUT_SECONDS: float = Field(default=5.0, ge=0, le=3600)
    WORKER_DB_STATEMENT_TIMEOUT_SECONDS: float = Field(default=300.0, ge=0, le=86400)

    def statement_timeout(self) -> float:
        """The statement timeout of this process's database connections."""
        if self.PROCESS_ROLE is ProcessRole.WORKER:
            return self.WORKER_DB_STATEMENT_TIMEOUT_SECONDS
        return self.DB_STATEMENT_TIMEOUT_SECONDS

    @field_validator("DATABASE_URL")
    @classmethod
    def _database_url(cls, value: str) -> str:
        # Anything but a PostgreSQL URL is refused below, and only with the postgres backend.
        if value.startswith(SCHEMES):
            parse_database_url(value)
        return value

    # The Redis of the broker, counters, caches and locks when BROKER=redis: redis://, rediss://
    # (TLS) or unix:///path, the database as the path or ?db=, a user and a percent-encoded
    # password before the host; TLS options ssl_cert_reqs (none, optional, required: the
    # default), ssl_ca_certs, ssl_ca_path, ssl_certfile, ssl_keyfile, ssl_password and
    # ssl_check_hostname. Every Redis client of a process connects with `redis_endpoint()`.
    REDIS_URL: str = "redis://127.0.0.1:6379/0"
    BROKER: BrokerKind = BrokerKind.FAKEREDIS

    @model_validator(mode="after")
    def _usable_redis_url(self) -> Self:
        if self.BROKER is BrokerKind.REDIS:
            self.redis_endpoint()  # raises a sentence saying what to change
        return self

    def redis_endpoint(self) -> RedisEndpoint:
        """Where REDIS_URL points and how to connect, parsed once for every client."""
        from app.core.redis_url import parse_redis_url

        return parse_redis_url(self.REDIS_URL)

    # Encrypts stored provider credentials and webhook secrets. Comma-separate several keys to
    # rotate: the first encrypts, all decrypt.
    SECRET_KEY: SecretStr | None = None

    MAX_REQUEST_BYTES: int = Field(default=10 * 1024 * 1024, ge=1024)

    # Once started, API and worker processes freeze their start-up objects out of the cycle
    # collector's sight and collect less often (`app.core.heap`).
    GC_SETTLE: bool = True

    # An API key with exactly this secret and admin rights is ensured at start-up (compose, CI,
    # and a `make run` key that survives restarts).
    ADMIN_API_KEY: SecretStr | None = None

    # A model validator, not a field one: a field validator's error would echo the value.
    @model_validator(mode="after")
    def _admin_key(self) -> Self:
        value = self.ADMIN_API_KEY
        if value is not None and not value.get_secret_value():
            self.ADMIN_API_KEY = None  # `ADMIN_API_KEY=` (an empty line in .env): no such key
        elif value is not None and len(value.get_secret_value()) < MIN_ADMIN_KEY_LENGTH:
            raise ValueError(
                f"ADMIN_API_KEY must be at least {MIN_ADMIN_KEY_LENGTH} characters long: it "
                "opens every admin route. Make one with `python -c 'import secrets; "
                'print("gw-" + secrets.token_urlsafe(32))\'`.'
            )
        return self

    # The administrator user created on first start; without a password one is generated and
    # printed once.
    ADMIN_USERNAME: str = Field(default="admin", min_length=3, max_length=100)
    ADMIN_DEFAULT_PASSWORD: SecretStr | None = None
    # Session tokens of signed-in users: HS256 signs with a key derived from SECRET_KEY; RS256
    # signs with JWT_PRIVATE_KEY (PEM) and also accepts the keys of JWT_JWKS (a JSON JWKS
    # document, e.g. the previous key during a rotation).
    JWT_ALGORITHM: JwtAlgorithm = JwtAlgorithm.HS256
    JWT_PRIVATE_KEY: SecretStr | None = None
    JWT_JWKS: str | None = None
    JWT_TTL_SECONDS: int = Field(default=8 * 3600, ge=60, le=30 * 24 * 3600)

    @model_validator(mode="after")
    def _coherent_sessions(self) -> Self:
        password = self.ADMIN_DEFAULT_PASSWORD
        if password is not None and len(password.get_secret_value()) < 8:
            raise ValueError(
                "ADMIN_DEFAULT_PASSWORD must be at least 8 characters long (or leave it unset to "
                "have a password generated and printed on first start)."
            )
        if self.JWT_ALGORITHM is JwtAlgorithm.RS256 and self.JWT_PRIVATE_KEY is None:
            raise ValueError(
                "JWT_ALGORITHM=RS256 signs session tokens with JWT_PRIVATE_KEY: set it to an RSA "
                "private key in PEM format, or use JWT_ALGORITHM=HS256."
            )
        return self

    # Sign-in throttling (`POST /auth/login`), counted in Redis across processes. After more
    # than LOGIN_MAX_FAILURES failed attempts on one username within the window, the account is
    # locked for LOGIN_LOCK_SECONDS, doubling with each further lock up to LOGIN_LOCK_MAX_SECONDS;
    # a locked account refuses even the right password (429). A client address gets the larger
    # LOGIN_ADDRESS_MAX_FAILURES budget across all usernames. 0 turns either off. The address is
    # the connection's peer; uvicorn takes it from X-Forwarded-For only when the peer is one of
    # FORWARDED_ALLOW_IPS (uvicorn's own setting, 127.0.0.1 by default).
    LOGIN_MAX_FAILURES: int = Field(default=5, ge=0)
    LOGIN_ADDRESS_MAX_FAILURES: int = Field(default=20, ge=0)
    LOGIN_FAILURE_WINDOW_SECONDS: float = Field(default=900.0, gt=0)
    LOGIN_LOCK_SECONDS: float = Field(default=1.0, ge=0.001)
    LOGIN_LOCK_MAX_SECONDS: float = Field(default=900.0, ge=0.001)

    @model_validator(mode="after")
    def _coherent_login_locks(self) -> Self:
        if self.LOGIN_LOCK_MAX_SECONDS < self.LOGIN_LOCK_SECONDS:
            raise ValueError(
                "LOGIN_LOCK_MAX_SECONDS is the longest sign-in lock, so it cannot be shorter than "
                "the first one (LOGIN_LOCK_SECONDS): raise it or lower LOGIN_LOCK_SECONDS."
            )
        return self

    # The job engine.
    JOB_MAX_ATTEMPTS: int = Field(default=3, ge=1, le=100)
    JOB_LEASE_SECONDS: float = Field(default=5.0, gt=0)
    JOB_HEARTBEAT_SECONDS: float | None = Field(default=None, gt=0)
    JOB_RETRY_BASE_SECONDS: float = Field(default=1.0, ge=0)
    JOB_RETRY_MAX_SECONDS: float = Field(default=300.0, ge=0)
    JOB_RESEND_AFTER_SECONDS: float = Field(default=3.0, gt=0)
    JOB_RETENTION_SECONDS: float = Field(default=7 * 24 * 3600.0, gt=0)
    SWEEP_INTERVAL_SECONDS: float = Field(default=1.0, gt=0)
    PURGE_INTERVAL_SECONDS: float = Field(default=300.0, gt=0)
    # How often the records of experiments are rolled up into their totals (results roll up
    # the rest when they are read).
    EXPERIMENT_ROLLUP_SECONDS: float = Field(default=10.0, gt=0)
    WORKER_THREADS: int = Field(default=8, ge=1, le=256)
    WORKER_PROCESSES: int = Field(default=1, ge=1, le=64)
    # Each `gateway worker` process touches a file of its own here this often while its event
    # loop turns; `gateway healthcheck` in a worker's container reads them.
    WORKER_HEARTBEAT_DIR: str = Field(
        default_factory=lambda: os.path.join(tempfile.gettempdir(), "llm-gateway-workers")
    )
    WORKER_HEARTBEAT_SECONDS: float = Field(default=5.0, gt=0, le=300)
    # With BROKER=redis, each `gateway worker` process stamps its presence in Redis every
    # quarter of this; a worker silent this long is gone, and its running jobs go back to
    # pending at once instead of after their lease (0: leases alone decide).
    WORKER_PRESENCE_TTL_SECONDS: float = Field(default=1.0, ge=0, le=60)
    LONG_POLL_MAX_SECONDS: float = Field(default=30.0, ge=0)
    # How long `POST /v1/workflows/{id}/execute` without `async` runs the workflow before it
    # answers 202 with the run's operation (the run goes on); `?wait=N` asks for less or more,
    # up to LONG_POLL_MAX_SECONDS.
    WORKFLOW_SYNC_TIMEOUT_SECONDS: float = Field(default=30.0, ge=0)

    # The built-in mock provider (a model's parameters may override these).
    MOCK_LATENCY_MS: float = Field(default=0.0, ge=0)
    MOCK_FAILURE_RATE: float = Field(default=0.0, ge=0, le=1)

    # Upstream calls (a model's `timeout_s`, `max_retries` and `backoff_ms` parameters override).
    UPSTREAM_TIMEOUT_SECONDS: float = Field(default=60.0, gt=0)
    UPSTREAM_CONNECT_TIMEOUT_SECONDS: float = Field(default=5.0, gt=0)
    UPSTREAM_MAX_RETRIES: int = Field(default=1, ge=0, le=10)
    UPSTREAM_MAX_CONNECTIONS: int = Field(default=200, ge=1)
    # Upstream calls also follow the process environment's standard HTTPS_PROXY, HTTP_PROXY,
    # ALL_PROXY and NO_PROXY (lower-case names too, read as curl and httpx read them), and all
    # outbound TLS (upstreams, webhooks) trusts SSL_CERT_FILE / SSL_CERT_DIR instead of the
    # system's CAs when set (`app/core/egress.py`). They are not fields, being read by other
    # tools too; a proxy URL that cannot work is refused here.
    # A circuit breaker per upstream model opens after this many consecutive failures and lets
    # one trial call through after the cool-down.
    BREAKER_FAILURE_THRESHOLD: int = Field(default=5, ge=1)
    BREAKER_COOLDOWN_SECONDS: float = Field(default=30.0, ge=0)
    # How long a process trusts a resolved model or chain before reading it again.
    ROUTE_CACHE_SECONDS: float = Field(default=2.0, ge=0)

    # Accounting. Default rate limits of every key (unset: unlimited); a key's or team's own
    # `rate_limits` take precedence.
    RATE_LIMIT_REQUESTS_PER_MINUTE: int | None = Field(default=None, ge=0)
    RATE_LIMIT_TOKENS_PER_MINUTE: int | None = Field(default=None, ge=0)
    RATE_LIMIT_REQUESTS_PER_DAY: int | None = Field(default=None, ge=0)
    RATE_LIMIT_TOKENS_PER_DAY: int | None = Field(default=None, ge=0)
    # Output tokens reserved (tokens and maximum cost at admission) for a call that sets no
    # max_tokens, at most what the model's context window leaves after the input, or its own
    # max_tokens. Unlike a client's max_tokens it need not fit under a limit or budget: such a
    # call is refused only when its input does not fit, and settlement counts the real usage.
    METERING_DEFAULT_MAX_OUTPUT_TOKENS: int = Field(default=4096, ge=1)
    # How long a process trusts its cached key and team limits, budgets and prices before
    # reading them again; admin changes drop them in every process at once (invalidation
    # channel), so this only bounds staleness when that channel is down (then 1 s at most).
    METERING_CACHE_SECONDS: float = Field(default=2.0, ge=0)
    # A direct call's usage commits before its answer leaves, the calls settling together
    # sharing one transaction of at most this many; a failed write is tried again this often.
    USAGE_WRITE_MAX_CALLS: int = Field(default=500, ge=1, le=5000)
    # How many of those transactions one process runs at once (each holds a pool connection).
    USAGE_WRITES_IN_FLIGHT: int = Field(default=2, ge=1, le=8)
    USAGE_RETRY_INTERVAL_SECONDS: float = Field(default=1.0, gt=0)
    # Defaults of the app configuration keys retention.usage_days, retention.logs_days and
    # logging.log_request_bodies.
    USAGE_RETENTION_DAYS: int = Field(default=30, ge=3)
    LOG_RETENTION_DAYS: int = Field(default=30, ge=1)
    LOG_REQUEST_BODIES: bool = False
    BUDGET_RESET_INTERVAL_SECONDS: float = Field(default=60.0, gt=0)
    ACCOUNTING_INTERVAL_SECONDS: float = Field(default=3600.0, gt=0)

    # Knowledge bases. A document is kept whole in the database (to ingest it again), and an
    # upload is also bounded by MAX_REQUEST_BYTES. Chunks are embedded this many per call.
    KNOWLEDGE_MAX_DOCUMENT_BYTES: int = Field(default=8 * 1024 * 1024, ge=1024)
    KNOWLEDGE_MAX_CHUNKS: int = Field(default=20_000, ge=1)
    KNOWLEDGE_EMBED_BATCH: int = Field(default=64, ge=1, le=2048)
    # `exact` (every install), or `hnsw`: an approximate graph (the `approximate` extra) for
    # bases of at least KNOWLEDGE_HNSW_MIN_CHUNKS chunks.
    KNOWLEDGE_SEARCH_INDEX: Literal["exact", "hnsw"] = "exact"
    KNOWLEDGE_HNSW_MIN_CHUNKS: int = Field(default=50_000, ge=1)

    @field_validator("KNOWLEDGE_SEARCH_INDEX")
    @classmethod
    def _search_index(cls, value: str) -> str:
        if value == "hnsw" and importlib.util.find_spec("usearch") is None:
            raise ValueError(
                "hnsw needs the approximate extra (usearch): install llm-gateway[approximate], "
                "or set exact."
            )
        return value

    # The Batch API. A file is kept whole in the database; an upload is also bounded by
    # MAX_REQUEST_BYTES, so keep this a little below it.
    FILE_MAX_BYTES: int = Field(default=8 * 1024 * 1024, ge=1024)
    BATCH_MAX_REQUESTS: int = Field(default=50_000, ge=1)

    # The response cache: `none`, `memory` (per process) or `redis` (shared; the in-process
    # stand-in under `gateway dev`). Off by default: with it, equal requests get equal answers.
    CACHE_BACKEND: CacheBackendKind = CacheBackendKind.NONE
    CACHE_TTL_SECONDS: float = Field(default=3600.0, gt=0)
    CACHE_MAX_ENTRIES: int = Field(default=10_000, ge=1)  # memory backend, exact entries
    # Longest wait on the cache store before answering without it (never fail a request on it).
    CACHE_TIMEOUT_SECONDS: float = Field(default=0.5, gt=0)
    # Semantic cache: an embedding model id turns it on; a hit needs this cosine similarity.
    CACHE_SEMANTIC_MODEL: str | None = None
    CACHE_SEMANTIC_THRESHOLD: float = Field(default=0.95, gt=0, le=1)
    CACHE_SEMANTIC_MAX_ENTRIES: int = Field(default=500, ge=1, le=100_000)

    # Calls to user-configured URLs (webhooks, provider endpoints, models' base_url) refuse
    # loopback, private and other internal addresses, except these comma-separated host names,
    # addresses or CIDR ranges (a local vLLM or Ollama needs `localhost`). Dev mode allows no more.
    OUTBOUND_ALLOWED_HOSTS: str = ""

    @field_validator("OUTBOUND_ALLOWED_HOSTS")
    @classmethod
    def _outbound_allowed_hosts(cls, value: str) -> str:
        # A mistyped entry (`localhost:8000`, `http://vllm`, `*.corp`) would allow nothing and
        # leave the operator wondering why: it is refused at startup, named.
        try:
            OutboundPolicy.parse(value)
        except ValueError as exc:
            raise ValueError(
                f"{exc}: list host names, addresses or CIDR ranges, comma-separated, e.g. "
                "localhost,10.0.0.0/8."
            ) from None
        return value

    # Webhooks: seconds before each delivery attempt (the first is usually 0).
    WEBHOOK_RETRY_SCHEDULE: str = "0,5,300,1800,7200,18000,36000,50400,72000,86400"
    WEBHOOK_TIMEOUT_SECONDS: float = Field(default=15.0, gt=0, le=60)
    # A subscription whose deliveries keep failing this long is disabled and flagged.
    WEBHOOK_DISABLE_AFTER_SECONDS: float = Field(default=5 * 24 * 3600.0, gt=0)
    # After a secret rotation, the old secret keeps signing for this long.
    WEBHOOK_ROTATION_OVERLAP_SECONDS: float = Field(default=24 * 3600.0, ge=0)
    # Finished deliveries (and their attempt logs) older than this are removed.
    WEBHOOK_DELIVERY_RETENTION_SECONDS: float = Field(default=30 * 24 * 3600.0, gt=0)

    @field_validator("WEBHOOK_RETRY_SCHEDULE")
    @classmethod
    def _schedule(cls, value: str) -> str:
        try:
            delays = [float(part) for part in value.split(",")]
        except ValueError:
            delays = []
        if not delays or any(d < 0 for d in delays) or len(delays) > 50:
            raise ValueError(
                "WEBHOOK_RETRY_SCHEDULE must list 1 to 50 comma-separated delays in seconds, "
                "e.g. 0,5,300,1800."
            )
        return value

    def webhook_retry_schedule(self) -> list[float]:
        """Seconds to wait before each delivery attempt."""
        return [float(part) for part in self.WEBHOOK_RETRY_SCHEDULE.split(",")]

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            if name in _URL_FIELDS and isinstance(value, str):
                value = without_passwords(value)
            yield name, value

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
        ProxyRules.from_environment()  # a ValueError here says which variable to fix
        return self

    @model_validator(mode="after")
    def _strong_secret_in_production(self) -> Self:
        if self.ENVIRONMENT.strip().lower() != "production":
            return self
        keys = self.secret_keys() if self.SECRET_KEY is not None else []
        # Only the first key encrypts; older ones stay accepted so that they can be rotated out.
        problem = weak_secret_problem(keys[0]) if keys else "is not set"
        if problem:
            raise ValueError(
                f"ENVIRONMENT=production needs a strong SECRET_KEY, and it {problem}: it encrypts "
                "stored provider credentials and webhook secrets, and signs session tokens. Make "
                "one with `python -c 'import secrets; print(secrets.token_urlsafe(32))'` and keep "
                "it: data encrypted with it cannot be read without it."
            )
        return self

    def secret_keys(self) -> list[str]:
        """The encryption keys, newest first (an ephemeral one when memory storage has none)."""
        if self.SECRET_KEY is None:
            return [self._ephemeral_key]
        return [k.strip() for k in self.SECRET_KEY.get_secret_value().split(",") if k.strip()]
