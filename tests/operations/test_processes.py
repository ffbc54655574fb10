"""The job promises with real processes: workers on real Redis and PostgreSQL, and `gateway dev`."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import psycopg
import pytest
import redis

from app.config import Settings
from app.operations.service import OperationService
from app.queue.names import OperationKind
from tests.processes import (
    ADMIN_KEY,
    OWNER,
    Processes,
    chat,
    env_for,
    free_port,
    httpx_client,
    running_lease_owner,
    statuses,
    wait_until,
)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


async def test_killing_a_worker_mid_run_loses_no_job_and_writes_each_result_once(
    clean: tuple[str, str], submitter: OperationService, processes: Processes
) -> None:
    database_url, redis_url = clean
    env = env_for(database_url, redis_url, MOCK_LATENCY_MS="200")
    for _ in range(2):
        processes.start(["worker", "--processes", "1", "--threads", "8"], env)
    ids = [
        (await submitter.submit(kind=OperationKind.CHAT_COMPLETION, input=chat(i), owner=OWNER))[
            0
        ].id
        for i in range(200)
    ]
    await asyncio.to_thread(
        wait_until, lambda: statuses(database_url).get("completed", 0) >= 20, 60
    )
    # Kill the worker process that holds a running job right now (lease owner: host-pid).
    owner = await asyncio.to_thread(running_lease_owner, database_url)
    os.kill(int(owner.rsplit("-", 1)[1]), signal.SIGKILL)
    killed_at = time.monotonic()
    await asyncio.to_thread(
        wait_until, lambda: statuses(database_url).get("completed", 0) == 200, 60
    )
    recovery = time.monotonic() - killed_at
    assert recovery < 2 + 20, f"took {recovery:.1f} s after the kill"
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT id, attempts, attempt_log, result FROM operations WHERE id = ANY(%s)", (ids,)
        ).fetchall()
    assert len(rows) == 200
    lost = 0
    for _, attempts, log, result in rows:
        outcomes = [entry["outcome"] for entry in log]
        assert outcomes.count("completed") == 1, outcomes
        assert outcomes[-1] == "completed" and attempts == len(log)
        assert result["object"] == "chat.completion"
        lost += outcomes.count("lost")
    assert lost >= 1, "the killed worker held no job: the test proved nothing"


def test_a_job_accepted_while_the_broker_is_down_completes_once_it_is_back(
    clean: tuple[str, str], processes: Processes, tmp_path: Path
) -> None:
    tmp_path = tmp_path / "redis"
    tmp_path.mkdir()
    database_url, _ = clean
    port = free_port()
    broker_url = f"redis://127.0.0.1:{port}/0"
    server_args = ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"]
    server_args += ["--dir", str(tmp_path)]

    def start_redis() -> subprocess.Popen[bytes]:
        server = subprocess.Popen(server_args, stdout=subprocess.DEVNULL, start_new_session=True)
        wait_until(lambda: _pings(broker_url), 10)
        return server

    server = start_redis()
    env = env_for(database_url, broker_url)
    processes.start(["worker", "--processes", "1", "--threads", "4"], env)
    server.terminate()
    server.wait(timeout=10)
    settings = Settings(**{**env, "PROCESS_ROLE": "api"})  # type: ignore[arg-type]
    with httpx_client(settings) as client:
        response = client.post(
            "/v1/chat/completions?async=true",
            json=chat(1),
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        )
        assert response.status_code == 202, response.text
        operation_id = response.json()["operation_id"]
        assert statuses(database_url) == {"pending": 1}
        server = start_redis()
        try:
            wait_until(lambda: statuses(database_url) == {"completed": 1}, 40)
            polled = client.get(
                f"/v1/operations/{operation_id}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
            )
            assert polled.json()["status"] == "completed"
        finally:
            server.terminate()
            server.wait(timeout=10)


def _pings(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.2).ping())
    except redis.RedisError:
        return False


def test_periodic_jobs_run_once_per_tick_across_two_workers(
    clean: tuple[str, str], processes: Processes
) -> None:
    database_url, redis_url = clean
    env = env_for(database_url, redis_url, SWEEP_INTERVAL_SECONDS="0.25")
    for _ in range(2):
        processes.start(["worker", "--processes", "1", "--threads", "2"], env)
    client = redis.Redis.from_url(redis_url)
    key = "gateway:periodic:sweep:runs"
    wait_until(lambda: client.llen(key) >= 1, 30)
    time.sleep(3)
    runs = [entry.decode().split(":", 1) for entry in client.lrange(key, 0, -1)]
    ticks = [int(tick) for tick, _ in runs]
    assert len(ticks) == len(set(ticks)), "a tick ran twice"
    assert len(ticks) >= 8, f"only {len(ticks)} runs in about 3 s at 4 per second"
    span = max(ticks) - min(ticks) + 1
    assert len(ticks) >= 0.8 * span, "ticks were skipped"
    assert len({owner for _, owner in runs}) >= 1


def test_a_worker_whose_whole_process_group_is_told_to_stop_exits_promptly(
    clean: tuple[str, str], processes: Processes
) -> None:
    # Procfile runners and `kill -TERM -<pgid>` signal every process of the group, and the
    # Dramatiq main process forwards the signal too: the worker process gets two SIGTERMs.
    database_url, redis_url = clean
    env = env_for(database_url, redis_url, SWEEP_INTERVAL_SECONDS="0.25")
    proc = processes.start(["worker", "--processes", "1", "--threads", "2"], env)
    client = redis.Redis.from_url(redis_url)
    wait_until(lambda: client.llen("gateway:periodic:sweep:runs") >= 1, 30)  # fully booted

    os.killpg(proc.pid, signal.SIGTERM)

    proc.wait(timeout=10)
    assert proc.returncode == 0


async def test_a_job_running_when_its_worker_is_told_to_stop_finishes_there_with_its_usage(
    clean: tuple[str, str], submitter: OperationService, processes: Processes
) -> None:
    database_url, redis_url = clean
    env = env_for(database_url, redis_url, MOCK_LATENCY_MS="1500", JOB_LEASE_SECONDS="30")
    proc = processes.start(["worker", "--processes", "1", "--threads", "2"], env)
    operation, _ = await submitter.submit(
        kind=OperationKind.CHAT_COMPLETION, input=chat(0), owner=OWNER
    )
    await asyncio.to_thread(wait_until, lambda: statuses(database_url) == {"running": 1}, 30)

    os.killpg(proc.pid, signal.SIGTERM)
    await asyncio.to_thread(proc.wait, 20)

    assert proc.returncode == 0
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT status, attempts FROM operations WHERE id = %s", (operation.id,)
        ).fetchone()
    # Finished by the worker that ran it, not left for the lease to run out (30 s here).
    assert row == ("completed", 1)
    # Its usage record committed with its outcome.
    with psycopg.connect(database_url) as conn:
        recorded = conn.execute("SELECT operation_id FROM usage_records").fetchall()
    assert recorded == [(operation.id,)]


def test_gateway_dev_answers_an_async_chat_completion_end_to_end(processes: Processes) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME")}
    proc = processes.start(["dev", "--port", str(port)], env, pipe=True)
    assert proc.stdout is not None
    key = None
    deadline = time.monotonic() + 30
    while key is None and time.monotonic() < deadline:
        line = proc.stdout.readline().decode()
        match = re.search(r"(gw-[A-Za-z0-9_-]+)", line)
        key = match.group(1) if match else None
    assert key, "gateway dev printed no API key"
    headers = {"Authorization": f"Bearer {key}"}
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: _answers(f"{base}/health"), 20)
    accepted = httpx.post(
        f"{base}/v1/chat/completions?async=true", json=chat(7), headers=headers, timeout=10
    )
    assert accepted.status_code == 202
    operation_id = accepted.json()["operation_id"]
    done = httpx.get(f"{base}/v1/operations/{operation_id}?wait=10", headers=headers, timeout=15)
    body = done.json()
    assert body["status"] == "completed", body
    assert body["result"]["choices"][0]["message"]["content"] == "Mock reply to: job 7"


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


async def test_a_killed_workers_jobs_run_again_within_seconds_while_slow_ones_keep_their_lease(
    clean: tuple[str, str], submitter: OperationService, processes: Processes
) -> None:
    database_url, redis_url = clean
    # Jobs of 3 s, far longer than a heartbeat's second; leases of 30 s, far longer than the
    # wait this test allows: only the heartbeat can hand a killed worker's job on in time.
    env = env_for(database_url, redis_url, MOCK_LATENCY_MS="3000", JOB_LEASE_SECONDS="30")
    for _ in range(3):
        processes.start(["worker", "--processes", "1", "--threads", "2"], env)
    ids = [
        (await submitter.submit(kind=OperationKind.CHAT_COMPLETION, input=chat(i), owner=OWNER))[
            0
        ].id
        for i in range(4)
    ]
    await asyncio.to_thread(wait_until, lambda: statuses(database_url) == {"running": 4}, 60)
    owners = dict(lease_owners(database_url, ids))
    victim = owners[ids[0]]
    os.kill(int(victim.rsplit("-", 1)[1]), signal.SIGKILL)
    killed_at = time.monotonic()
    orphans = [op_id for op_id, owner in owners.items() if owner == victim]

    def reclaimed() -> bool:
        now = dict(lease_owners(database_url, orphans))  # running ones only
        return len(now) == len(orphans) and victim not in now.values()

    await asyncio.to_thread(wait_until, reclaimed, 10, 0.02)
    after = time.monotonic() - killed_at
    print(f"re-claimed {after:.2f} s after the kill (lease 30 s)")
    # About 1.5 s (a second's heartbeat, half a second's sweep, a worker's pick-up); the
    # margin is for a busy machine, still far inside the lease.
    assert after < 4.0
    await asyncio.to_thread(wait_until, lambda: statuses(database_url) == {"completed": 4}, 30)
    with psycopg.connect(database_url) as conn:
        attempts = dict(
            conn.execute("SELECT id, attempts FROM operations WHERE id = ANY(%s)", (ids,))
        )
    assert {op_id: attempts[op_id] for op_id in orphans} == dict.fromkeys(orphans, 2)
    survivors = [op_id for op_id in ids if op_id not in orphans]
    assert survivors and all(attempts[op_id] == 1 for op_id in survivors)  # slow, not stolen


def lease_owners(database_url: str, ids: list[str]) -> list[tuple[str, str | None]]:
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            "SELECT id, lease_owner FROM operations WHERE id = ANY(%s) AND status = 'running'",
            (ids,),
        ).fetchall()
