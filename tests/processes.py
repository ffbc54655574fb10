"""Helpers of the tests that run the gateway as real processes on PostgreSQL and Redis.

`Processes` starts `python -m app …` in sessions of their own and kills them at the end;
`env_for` is the environment they share; the fixtures `processes`, `clean` and `submitter`
are imported by the test modules that use them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from app.access.service import ApiKeyService
from app.config import Settings
from app.main import create_app
from app.operations.service import OperationService
from app.operations.submit import Owner
from app.queue.broker import build_broker
from app.queue.port import build_queue
from app.storage.sql import SqlStorage, make_database
from tests.conftest import truncate_all

ADMIN_KEY = "gw-test-admin-key-0123456789abcdefghij"
OWNER = Owner(key_id="admin")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def env_for(database_url: str, redis_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME")}
    env.update(
        STORAGE_BACKEND="postgres",
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        BROKER="redis",
        SECRET_KEY="test-secret-key-for-processes",
        ADMIN_API_KEY=ADMIN_KEY,
        JOB_LEASE_SECONDS="2",
        JOB_RESEND_AFTER_SECONDS="2",
        SWEEP_INTERVAL_SECONDS="0.5",
        LOG_LEVEL="WARNING",
    )
    env.update(extra)
    return env


class Processes:
    """Subprocesses started by a test, each in its own session, all killed at the end."""

    def __init__(self, logs: Path) -> None:
        self.started: list[subprocess.Popen[bytes]] = []
        self.logs = logs

    def start(
        self, args: list[str], env: dict[str, str], *, pipe: bool = False
    ) -> subprocess.Popen[bytes]:
        # Logs go to files (a pipe nobody reads would fill up and stall the process).
        out = subprocess.PIPE if pipe else (self.logs / f"{len(self.started)}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "app", *args],
            cwd=self.logs,  # not the checkout: a developer's .env there must not leak in
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.started.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def stop_all(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.started:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    yield procs
    procs.stop_all()
    for log in sorted(tmp_path.glob("*.log")):
        print(f"---- {log.name}\n{log.read_text(errors='replace')[-3000:]}")


@pytest.fixture
def clean(database_url: str, redis_url: str) -> tuple[str, str]:
    truncate_all(database_url)
    redis.Redis.from_url(redis_url).flushdb()
    return database_url, redis_url


@pytest.fixture
async def submitter(clean: tuple[str, str]) -> AsyncIterator[OperationService]:
    database_url, redis_url = clean
    settings = Settings(**env_for(database_url, redis_url, PROCESS_ROLE="api"))  # type: ignore[arg-type]
    storage = SqlStorage(make_database(database_url))
    # Workers check a job's key when they run it, so the owner key must exist, as it does for
    # every job the API accepts.
    await ApiKeyService(storage).ensure_key(
        key_id=OWNER.key_id or "admin", name="test", secret=ADMIN_KEY, admin=True
    )
    queue = build_queue(settings, build_broker(settings))
    yield OperationService(storage, queue)
    await queue.aclose()
    await storage.close()


def statuses(database_url: str) -> dict[str, int]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT status, count(*) FROM operations GROUP BY status").fetchall()
    return {status: count for status, count in rows}


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def running_lease_owner(database_url: str) -> str:
    found: list[str] = []

    def running() -> bool:
        with psycopg.connect(database_url) as conn:
            row = conn.execute(
                "SELECT lease_owner FROM operations WHERE status = 'running' LIMIT 1"
            ).fetchone()
        if row and row[0]:
            found.append(row[0])
        return bool(found)

    wait_until(running, 30, interval=0.02)
    return found[0]


def chat(i: int) -> dict[str, object]:
    return {"model": "mock", "messages": [{"role": "user", "content": f"job {i}"}]}


def httpx_client(settings: Settings) -> Any:
    from fastapi.testclient import TestClient

    return TestClient(create_app(settings))
