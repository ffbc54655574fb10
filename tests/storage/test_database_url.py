"""DATABASE_URL options: refused at start-up with a sentence when the drivers cannot both honour
them, and in force on the pool's connections and on the migrations' connection alike."""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from asyncpg import connect_utils
from psycopg.conninfo import conninfo_to_dict
from pydantic import ValidationError

from app.cli import main
from app.config import Settings
from app.core.database_url import InvalidDatabaseUrl, parse_database_url
from app.core.errors import Unavailable
from app.storage.migrate import upgrade_to_head
from app.storage.sql import Database

OPTIONS = "-c statement_timeout=4321 -c lock_timeout=1234"


@pytest.fixture(autouse=True)
def _no_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env


def with_options(url: str, query: str) -> str:
    return url + ("&" if "?" in url else "?") + query


def asyncpg_reading(url: str) -> tuple[list[Any], Any]:
    """The addresses and parameters asyncpg makes of a URL, before connecting."""
    return connect_utils._parse_connect_dsn_and_args(  # type: ignore[no-any-return]
        dsn=url,
        host=None,
        port=None,
        user=None,
        password=None,
        passfile=None,
        database=None,
        ssl=None,
        service=None,
        servicefile=None,
        direct_tls=None,
        server_settings=None,
        target_session_attrs=None,
        krbsrvname=None,
        gsslib=None,
    )


# ---- checked at start-up ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "sentence"),
    [
        pytest.param("bogus=1", "'bogus' is not an option the gateway knows", id="unknown"),
        pytest.param(
            "statement_timeout=5000", "A server setting goes in options", id="bare-setting"
        ),
        pytest.param("sslmode=maybe", "sslmode must be one of disable, allow", id="sslmode"),
        pytest.param("connect_timeout=2.5", "connect_timeout must be a whole number", id="t/o"),
        pytest.param("connect_timeout=0", "connect_timeout must be a whole number", id="t/o-0"),
        pytest.param("options=-B%201", "options must be server settings written -c", id="opt"),
        pytest.param("options=-c%20work_mem", "options must be server settings", id="opt-no-="),
        pytest.param("options=-c%20TimeZone%3DCET", "cannot set TimeZone", id="timezone"),
        pytest.param("sslmode=require&sslmode=disable", "sets the option 'sslmode' twice", id="2x"),
        pytest.param("sslmode", "has a query part without '='", id="no-value"),
        pytest.param("target_session_attrs=writable", "target_session_attrs must be", id="tsa"),
        pytest.param("sslrootcert=/no/such/ca.pem", "sslrootcert: cannot read the file", id="ca"),
        pytest.param("dbname=other", "sets the dbname both in the address", id="dbname-twice"),
    ],
)
def test_an_option_the_drivers_cannot_both_honour_is_refused_naming_it(
    query: str, sentence: str
) -> None:
    with pytest.raises(InvalidDatabaseUrl, match=re.escape(sentence)):
        parse_database_url(f"postgresql://gateway@db:5432/gateway?{query}")


def test_a_port_that_is_not_a_number_is_refused() -> None:
    with pytest.raises(InvalidDatabaseUrl, match="the port of host 'db:54x2'"):
        parse_database_url("postgresql://gateway@db:54x2/gateway")


def test_certificate_checks_without_a_certificate_authority_are_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.postgresql/root.crt
    monkeypatch.delenv("PGSSLROOTCERT", raising=False)
    with pytest.raises(InvalidDatabaseUrl, match=r"set sslrootcert=/path/to/ca\.pem in the URL"):
        parse_database_url("postgresql://gateway@db/gateway?sslmode=verify-full")
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    parse_database_url(f"postgresql://gateway@db/gateway?sslmode=verify-ca&sslrootcert={ca}")


def test_settings_refuse_a_bad_option_with_the_sentence_and_without_the_password() -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(DATABASE_URL="postgresql://gateway@db/gateway?sslmode=on&password=hunter2")
    assert "sslmode must be one of" in str(refused.value)
    assert "hunter2" not in str(refused.value)


def test_the_command_exits_2_with_the_sentence(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://gateway@db/gateway?application=gw")
    assert main(["migrate"]) == 2
    err = capsys.readouterr().err
    assert "DATABASE_URL: 'application' is not an option the gateway knows" in err
    assert "Traceback" not in err


def test_both_drivers_read_the_same_password_user_hosts_and_options() -> None:
    url = parse_database_url(
        "postgres://gate%20way:p%40ss?w#rd+1@db1:5432,db2:5433/gate%2Fway"
        "?sslmode=require&application_name=gateway+api&options=-c%20work_mem%3D64MB"
        "&target_session_attrs=read-write&connect_timeout=7"
    )
    libpq = conninfo_to_dict(url.libpq)
    assert (libpq["user"], libpq["password"], libpq["dbname"]) == (
        "gate way",
        "p@ss?w#rd+1",
        "gate/way",
    )
    assert (libpq["host"], libpq["port"]) == ("db1,db2", "5432,5433")
    assert libpq["application_name"] == "gateway+api"
    assert libpq["options"] == "-c work_mem=64MB"
    assert (libpq["sslmode"], libpq["connect_timeout"]) == ("require", "7")

    addresses, params = asyncpg_reading(url.asyncpg)
    assert addresses == [("db1", 5432), ("db2", 5433)]
    assert params.user == "gate way" and params.database == "gate/way"
    assert params.password == "p@ss?w#rd+1"
    assert params.ssl is not None and params.ssl is not False
    assert str(params.target_session_attrs) == "SessionAttribute.read_write"
    assert not params.server_settings  # nothing the server would refuse as a setting
    assert url.server_settings == {"application_name": "gateway+api", "work_mem": "64MB"}
    assert url.connect_timeout == 7
    assert "p%40ss" not in url.redacted and "***" in url.redacted


def test_an_options_string_keeps_escaped_spaces_and_long_forms() -> None:
    url = parse_database_url(
        "postgresql://db/gateway?options=-csearch_path%3Da%2C%5C%20b%20--work-mem%3D64MB"
    )
    assert url.server_settings == {"search_path": "a, b", "work_mem": "64MB"}


# ---- in force on the real server -------------------------------------------------------------


def _query(name: str) -> str:
    options = OPTIONS.replace(" ", "%20").replace("=", "%3D")
    return f"application_name={name}&options={options}&connect_timeout=5"


@pytest.mark.postgres
async def test_application_name_and_options_apply_to_pooled_connections(
    database_url: str,
) -> None:
    name = f"gateway+pool-{os.getpid()}"  # a '+' is a plus, as libpq reads it
    database = Database(with_options(database_url, _query(name)), pool_size=1, max_overflow=0)
    try:
        conn = await database.acquire()
        try:
            assert await conn.fetchval("SHOW application_name") == name
            assert await conn.fetchval("SHOW statement_timeout") == "4321ms"
            assert await conn.fetchval("SHOW lock_timeout") == "1234ms"
            assert await conn.fetchval("SHOW timezone") == "UTC"
            seen = await conn.fetchval(
                "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()"
            )
            assert seen == name
        finally:
            database.release(conn)
    finally:
        await database.close()


@pytest.fixture
def alembic_sessions() -> Iterator[list[dict[str, str]]]:
    """The application name and timeouts of every connection SQLAlchemy opens meanwhile."""
    seen: list[dict[str, str]] = []

    def record(dbapi_connection: Any, _: Any) -> None:
        cursor = dbapi_connection.cursor()
        values = {}
        for setting in ("application_name", "statement_timeout", "lock_timeout"):
            cursor.execute(f"SHOW {setting}")
            values[setting] = cursor.fetchone()[0]
        cursor.close()
        seen.append(values)

    sa.event.listen(sa.engine.Engine, "connect", record)
    yield seen
    sa.event.remove(sa.engine.Engine, "connect", record)


@pytest.mark.postgres
def test_application_name_and_options_apply_to_the_migrations_connection(
    database_url: str, alembic_sessions: list[dict[str, str]]
) -> None:
    name = f"gateway+migrate-{os.getpid()}"
    upgrade_to_head(with_options(database_url, _query(name)))  # at head: connects, changes none
    assert alembic_sessions == [
        {"application_name": name, "statement_timeout": "4321ms", "lock_timeout": "1234ms"}
    ]


@pytest.mark.postgres
async def test_a_host_list_reaches_the_first_host_that_answers_for_both_drivers(
    database_url: str, alembic_sessions: list[dict[str, str]]
) -> None:
    scheme, _, rest = database_url.partition("://")
    credentials = ""
    if "@" in rest.partition("/")[0]:
        credentials, _, rest = rest.partition("@")
        credentials += "@"
    listed = f"{scheme}://{credentials}127.0.0.1:1,{rest}"  # nothing listens on port 1
    database = Database(listed, pool_size=1, max_overflow=0)
    try:
        conn = await database.acquire()
        assert await conn.fetchval("SELECT 1") == 1
        database.release(conn)
    finally:
        await database.close()
    upgrade_to_head(listed)
    assert len(alembic_sessions) == 1


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield server.getsockname()[1]
    server.close()


async def test_connect_timeout_in_the_url_bounds_opening_a_connection(silent_server: int) -> None:
    url = f"postgresql://postgres@127.0.0.1:{silent_server}/gateway?connect_timeout=1"
    database = Database(url, pool_size=1, max_overflow=0, connect_timeout=30)
    started = time.monotonic()
    try:
        with pytest.raises(Unavailable, match="TimeoutError"):
            await database.acquire()
    finally:
        await database.close()
    assert time.monotonic() - started < 5
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(parse_database_url(url).libpq)
    assert time.monotonic() - started < 5  # libpq waits at least 2 seconds


def _server_has_tls(database_url: str) -> bool:
    with psycopg.connect(database_url) as conn:
        return conn.execute("SHOW ssl").fetchone() == ("on",)


@pytest.mark.postgres
async def test_sslmode_disable_connects_without_tls(database_url: str) -> None:
    url = with_options(database_url, "sslmode=disable")
    database = Database(url, pool_size=1, max_overflow=0)
    try:
        conn = await database.acquire()
        try:
            in_use = await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            assert in_use is False
        finally:
            database.release(conn)
    finally:
        await database.close()
    with psycopg.connect(parse_database_url(url).libpq) as conn:
        assert conn.pgconn.ssl_in_use is False


@pytest.mark.postgres
async def test_sslmode_require_uses_tls_or_fails_saying_the_server_has_none(
    database_url: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = with_options(database_url, "sslmode=require")
    database = Database(url, pool_size=1, max_overflow=0)
    if _server_has_tls(database_url):
        try:
            conn = await database.acquire()
            in_use = await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            database.release(conn)
            assert in_use is True
        finally:
            await database.close()
        with psycopg.connect(parse_database_url(url).libpq) as conn:
            assert conn.pgconn.ssl_in_use is True
        return
    # This server runs without TLS: both drivers refuse to go on in clear text, and say why.
    try:
        with (
            caplog.at_level(logging.WARNING, logger="app.storage.pool"),
            pytest.raises(Unavailable, match="database unreachable"),
        ):
            await database.acquire()
    finally:
        await database.close()
    assert "rejected SSL upgrade" in caplog.text
    monkeypatch.setenv("DATABASE_URL", url)
    assert main(["migrate"]) == 1
    err = capsys.readouterr().err
    assert "server does not support SSL, but SSL was required" in err
    assert "Traceback" not in err
