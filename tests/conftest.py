"""Shared fixtures: settings and the real PostgreSQL and Redis servers the suite runs against."""

from __future__ import annotations

import os
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from app.config import Settings
from app.storage.protocol import Storage
from tests.redis_servers import RedisServer
from tests.tls import Certificates, make_certificates

# The fixtures of the tests that start real processes (`processes`, `clean`, `submitter`).
pytest_plugins = ["tests.processes"]

# A test process builds many apps: freezing the heap at each start-up (`app.core.heap`) would
# keep every earlier app's reference cycles for the rest of the session.
os.environ.setdefault("GC_SETTLE", "false")

# Settings built by tests never read the checkout's `.env` (a developer's ADMIN_API_KEY, say).
Settings.model_config["env_file"] = None

# One database per test session, so two sessions on one server never disturb each other.
TEST_DATABASE_URL = os.environ.get(
    "TEST_DATABASE_URL", f"postgresql://postgres@127.0.0.1:5432/gateway_test_{os.getpid()}"
)
# With pytest-xdist each worker process takes its own Redis database (gw0 → 15, gw1 → 14, …),
# because the suite flushes its database at the start and the end.
_XDIST_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", f"redis://127.0.0.1:6379/{15 - _XDIST_WORKER}")


def _admin_url(url: str) -> tuple[str, str]:
    """The URL of the server's `postgres` database, and the name of the database in `url`."""
    base, _, name = url.rpartition("/")
    return f"{base}/postgres", name.split("?")[0]


def ensure_database(url: str, *, fresh: bool = False) -> None:
    """Create the database named in `url` (dropping it first when `fresh`)."""
    admin, name = _admin_url(url)
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=3) as conn:
            if fresh:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
            ).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL is required for this test and is not reachable at {admin}: {exc}. "
            "Start it (see README, 'Tests') or set TEST_DATABASE_URL.",
            pytrace=False,
        )


def drop_database(url: str) -> None:
    """Drop a scratch database after its tests. A drop that waits too long (DROP DATABASE waits
    for a checkpoint, slow on a busy host) is given up with a warning: what is left is an
    unused database with a name of its own, and the tests it served have passed."""
    admin, name = _admin_url(url)
    with psycopg.connect(admin, autocommit=True, connect_timeout=3) as conn:
        conn.execute("SET statement_timeout = '30s'")
        try:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except psycopg.errors.QueryCanceled:
            warnings.warn(
                f"left database {name} in place: dropping it took over 30 s", stacklevel=2
            )


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A migrated test database on the real server (created once per run, dropped after)."""
    from app.storage.migrate import upgrade_to_head

    ensure_database(TEST_DATABASE_URL, fresh=True)
    upgrade_to_head(TEST_DATABASE_URL)
    yield TEST_DATABASE_URL
    if "TEST_DATABASE_URL" not in os.environ:
        drop_database(TEST_DATABASE_URL)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A database on the real Redis server, flushed before and after the run."""
    client = redis.Redis.from_url(TEST_REDIS_URL, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(
            f"Redis is required for this test and is not reachable at {TEST_REDIS_URL}: {exc}",
            pytrace=False,
        )
    client.flushdb()
    yield TEST_REDIS_URL
    client.flushdb()
    client.close()


def truncate_all(database_url: str) -> None:
    """Empty every table of the schema (fast enough to run before each test).

    Only the tables that hold rows are emptied, by DELETE with foreign-key triggers off (every
    non-empty table goes, so no reference is left dangling): a TRUNCATE of every table costs a
    new file per table and index, about 0.3 s, against a few milliseconds for this.
    """
    from app.schema import ENTITIES
    from app.storage.mapping import table_info

    names = [table_info(e).name for e in ENTITIES]
    probe = " UNION ALL ".join(
        f"SELECT '{name}' WHERE EXISTS (SELECT 1 FROM \"{name}\")" for name in names
    )
    with psycopg.connect(database_url, autocommit=True) as conn:
        filled = [row[0] for row in conn.execute(probe).fetchall()]
        if not filled:
            return
        with conn.transaction():
            conn.execute("SET LOCAL session_replication_role = replica")
            for name in filled:
                conn.execute(f'DELETE FROM "{name}"')


@pytest.fixture(params=["memory", "postgres"])
async def storage(request: pytest.FixtureRequest) -> AsyncIterator[Storage]:
    """Each test using it runs once on memory and once on an emptied PostgreSQL database."""
    from app.storage.memory import MemoryStorage
    from app.storage.sql import SqlStorage, make_database

    if request.param == "memory":
        yield MemoryStorage()
        return
    database_url = request.getfixturevalue("database_url")
    truncate_all(database_url)
    backend = SqlStorage(make_database(database_url, pool_size=20, max_overflow=20))
    yield backend
    await backend.close()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Starts redis-servers of the test's own (options of `RedisServer`); all stop at its end."""
    servers: list[RedisServer] = []

    def start(**options: Any) -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{len(servers)}", **options)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.remove()


@pytest.fixture(scope="session")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """A CA with a server certificate (127.0.0.1, localhost) and a client one, as PEM files."""
    return make_certificates(tmp_path_factory.mktemp("tls"))
