"""Replicas start together: API processes and migrations started at the same instant on a
database that does not exist yet all come up, and every start-up write happens once."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.conftest import TEST_DATABASE_URL, drop_database
from tests.processes import ADMIN_KEY, Processes, env_for, free_port, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

APIS = 4
MIGRATIONS = 2
# Rounds of the race in the suite; `STARTUP_ROUNDS=10` runs the ten in a row of the acceptance
# check (each round starts six processes, about 13 s on two cores).
ROUNDS = int(os.environ.get("STARTUP_ROUNDS", "3"))


@pytest.fixture
def fresh_database() -> Iterator[str]:
    """The URL of a database of this test's own that does not exist yet (dropped after)."""
    base, _, name = TEST_DATABASE_URL.rpartition("/")
    url = f"{base}/{name}_startup"
    drop_database(url)
    yield url
    drop_database(url)


def ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def migrate_and_seed(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """What compose's `migrate` service runs: `gateway migrate && gateway seed`."""
    gateway = f"{sys.executable} -m app"
    return subprocess.Popen(
        ["sh", "-c", f"{gateway} migrate && {gateway} seed"],
        cwd=log.parent,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


@pytest.mark.parametrize("attempt", range(ROUNDS))
def test_apis_and_migrations_started_together_on_no_database_all_come_up(
    attempt: int, fresh_database: str, redis_url: str, processes: Processes, tmp_path: Path
) -> None:
    env = env_for(fresh_database, redis_url, LOG_LEVEL="WARNING")
    ports = [free_port() for _ in range(APIS)]
    migrations = [migrate_and_seed(env, tmp_path / f"migrate-{n}.log") for n in range(MIGRATIONS)]
    try:
        for port in ports:
            processes.start(["api", "--port", str(port)], env)
        for migration in migrations:
            assert migration.wait(timeout=60) == 0, "a migration failed (see its log)"
        for port in ports:
            wait_until(lambda port=port: ready(port), 30)  # type: ignore[misc]
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        for port in ports:  # ADMIN_API_KEY works on each of them
            answer = httpx.get(f"http://127.0.0.1:{port}/admin/keys", headers=headers, timeout=5)
            assert answer.status_code == 200, answer.text
        assert all(proc.poll() is None for proc in processes.started)
    finally:
        for migration in migrations:
            if migration.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(migration.pid, signal.SIGKILL)
    with psycopg.connect(fresh_database) as conn:
        counts = {
            table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()
            for table in ("api_keys", "teams", "team_members", "users", "prompts")
        }
    # Each written once: the admin key, the administrators team, its first user and membership.
    assert counts == {
        "api_keys": (1,),
        "teams": (1,),
        "team_members": (1,),
        "users": (1,),
        "prompts": (3,),
    }
