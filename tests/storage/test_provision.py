"""`gateway migrate` on a server without the database: creates it and says so, or, when the
user may not, says what to run instead."""

from __future__ import annotations

import secrets
import shlex
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
from psycopg import sql

from app.cli import main
from app.config import Settings
from app.core.database_url import parse_database_url
from app.schema import ENTITIES
from app.storage.mapping import table_info
from app.storage.provision import create_database_if_missing
from tests.conftest import TEST_DATABASE_URL

pytestmark = pytest.mark.postgres

SERVER = TEST_DATABASE_URL.split("?")[0].rpartition("/")[0]  # scheme, credentials and host


@pytest.fixture(autouse=True)
def _no_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env


def _admin() -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(f"{SERVER}/postgres", autocommit=True)


def exists(name: str) -> bool:
    with _admin() as conn:
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        return found.fetchone() is not None


@pytest.fixture
def missing_name() -> Iterator[str]:
    """The name of a database the server does not have (dropped after the test if created);
    a space and a quote in it check that it is quoted, not pasted."""
    name = f'gateway new "{secrets.token_hex(4)}"'
    assert not exists(name)
    yield name
    with _admin() as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def test_migrate_creates_a_missing_database_says_so_and_migrates_it(
    missing_name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"{SERVER}/{quote(missing_name)}?application_name=gateway-migrate"
    monkeypatch.setenv("DATABASE_URL", url)

    assert main(["migrate"]) == 0
    out = capsys.readouterr().out
    assert f"Created database {missing_name} on 127.0.0.1." in out.splitlines()
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        assert {table_info(e).name for e in ENTITIES} <= {name for (name,) in rows}

    assert main(["migrate"]) == 0  # there now: nothing to create
    assert "Created database" not in capsys.readouterr().out


@pytest.fixture
def role_without_createdb() -> Iterator[str]:
    name = f"gateway_nocreate_{secrets.token_hex(4)}"
    with _admin() as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN NOCREATEDB").format(sql.Identifier(name)))
    yield name
    with _admin() as conn:
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def test_migrate_without_the_right_to_create_it_says_what_to_run(
    missing_name: str,
    role_without_createdb: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    host = SERVER.rpartition("@")[2]
    monkeypatch.setenv(
        "DATABASE_URL", f"postgresql://{role_without_createdb}@{host}/{quote(missing_name)}"
    )

    assert main(["migrate"]) == 1
    err = capsys.readouterr().err
    assert f"user {role_without_createdb} may not create it" in err
    assert f"createdb -h 127.0.0.1 -p 5432 -U postgres {shlex.quote(missing_name)}" in err
    assert "Traceback" not in err
    assert not exists(missing_name)


def test_migrate_reports_other_refusals_as_they_are(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    host = SERVER.rpartition("@")[2]
    stranger = f"gateway_nobody_{secrets.token_hex(4)}"
    monkeypatch.setenv("DATABASE_URL", f"postgresql://{stranger}@{host}/gateway")

    assert main(["migrate"]) == 1
    err = capsys.readouterr().err
    assert f'role "{stranger}" does not exist' in err
    assert "Created database" not in capsys.readouterr().out


def test_migrations_creating_one_missing_database_together_all_succeed(missing_name: str) -> None:
    url = parse_database_url(f"{SERVER}/{quote(missing_name)}")
    barrier = threading.Barrier(4)
    outcomes: list[object] = []

    def create() -> None:
        barrier.wait()
        try:
            outcomes.append(create_database_if_missing(url))
        except Exception as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=create) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(outcomes, key=str) == ["127.0.0.1", None, None, None]  # created once
    assert exists(missing_name)
