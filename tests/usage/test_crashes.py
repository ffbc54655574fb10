"""Usage survives crashes: workers and the API killed mid-run, Redis emptied after a burst.

Real PostgreSQL and Redis; workers and the API as real processes (SIGKILL leaves them no
time to flush anything), two API apps in this process for the Redis test.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import httpx
import psycopg
import pytest
import redis.asyncio as aioredis

from app.operations.service import OperationService
from app.queue.names import OperationKind
from app.storage.sql import SqlStorage, make_database
from tests.conftest import truncate_all
from tests.processes import (
    ADMIN_KEY,
    OWNER,
    Processes,
    chat,
    env_for,
    free_port,
    running_lease_owner,
    statuses,
    wait_until,
)
from tests.usage.test_api import ADMIN, app_on, serve, services_of
from tests.usage.test_chat_metering import CALL, add_priced_model

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]


def count_by_operation(database_url: str, table: str) -> dict[str, int]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            f"SELECT operation_id, count(*) FROM {table} GROUP BY operation_id"
        ).fetchall()
    return {operation_id: count for operation_id, count in rows}


async def kill_a_running_worker(database_url: str, completed: int) -> None:
    """SIGKILL the worker process that holds a running job, once `completed` jobs are done."""
    await asyncio.to_thread(
        wait_until, lambda: statuses(database_url).get("completed", 0) >= completed, 60
    )
    owner = await asyncio.to_thread(running_lease_owner, database_url)
    os.kill(int(owner.rsplit("-", 1)[1]), signal.SIGKILL)


async def test_killed_workers_leave_exactly_one_usage_record_and_log_per_completed_job(
    clean: tuple[str, str], submitter: OperationService, processes: Processes
) -> None:
    database_url, redis_url = clean
    env = env_for(database_url, redis_url, MOCK_LATENCY_MS="300")
    worker = ["worker", "--processes", "1", "--threads", "8"]
    for _ in range(2):
        processes.start(worker, env)
    jobs = 200
    ids = [
        (await submitter.submit(kind=OperationKind.CHAT_COMPLETION, input=chat(i), owner=OWNER))[
            0
        ].id
        for i in range(jobs)
    ]
    await kill_a_running_worker(database_url, 20)
    processes.start(worker, env)  # a replacement, as an orchestrator would start
    await kill_a_running_worker(database_url, 90)
    await asyncio.to_thread(
        wait_until, lambda: statuses(database_url).get("completed", 0) == jobs, 60
    )
    with psycopg.connect(database_url) as conn:
        logs = conn.execute(
            "SELECT attempt_log FROM operations WHERE id = ANY(%s)", (ids,)
        ).fetchall()
    lost = sum([entry["outcome"] for entry in log].count("lost") for (log,) in logs)
    assert lost >= 2, "the killed workers held no job: the test proved nothing"
    records = count_by_operation(database_url, "usage_records")
    entries = count_by_operation(database_url, "execution_logs")
    assert records == dict.fromkeys(ids, 1)
    assert entries == dict.fromkeys(ids, 1)


async def test_an_api_killed_right_after_direct_calls_has_recorded_every_call_it_answered(
    clean: tuple[str, str], processes: Processes
) -> None:
    database_url, redis_url = clean
    port = free_port()
    env = env_for(
        database_url, redis_url, MOCK_LATENCY_MS="20", LOG_REQUEST_BODIES="true", PORT=str(port)
    )
    api = processes.start(["api"], env)
    base = f"http://127.0.0.1:{port}"
    await asyncio.to_thread(wait_until, lambda: _ready(base), 30)
    answered: list[str] = []
    enough = asyncio.Event()
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=10) as client:

        async def one(n: int) -> None:
            body = {"model": "mock", "messages": [{"role": "user", "content": f"call {n}"}]}
            response = await client.post("/v1/chat/completions", json=body, headers=headers)
            if response.status_code == 200:
                answered.append(response.json()["id"])
                if len(answered) >= 150:
                    enough.set()

        calls = [asyncio.ensure_future(one(n)) for n in range(400)]
        await asyncio.wait_for(enough.wait(), 30)
        os.killpg(api.pid, signal.SIGKILL)  # with calls in flight, and nothing flushed
        await asyncio.gather(*calls, return_exceptions=True)
    api.wait(timeout=10)
    assert 150 <= len(answered) < 400
    with psycopg.connect(database_url) as conn:
        outputs = conn.execute("SELECT output FROM execution_logs").fetchall()
        (records,) = conn.execute("SELECT count(*) FROM usage_records").fetchone() or (0,)
    logged = {output["id"] for (output,) in outputs}
    assert set(answered) <= logged  # every answer had its usage committed before it left
    assert records == len(outputs)  # a record with each log: one transaction


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
async def two_apis(
    database_url: str, redis_url: str
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    """Two API apps on one PostgreSQL and one Redis, each with pools and clients of its own."""
    truncate_all(database_url)
    settings = {
        "STORAGE_BACKEND": "postgres",
        "PROCESS_ROLE": "api",
        "BROKER": "redis",
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
        "SECRET_KEY": "crash-tests-secret-key-0123456789",
        "METERING_CACHE_SECONDS": 0,
    }
    async with AsyncExitStack() as stack:
        clients = []
        for _ in range(2):
            storage = SqlStorage(make_database(database_url, pool_size=8, max_overflow=0))
            stack.push_async_callback(storage.close)
            clients.append(await stack.enter_async_context(serve(app_on(storage, **settings))))
        await add_priced_model(services_of(clients[0]).storage)
        yield clients[0], clients[1]


async def test_a_redis_emptied_right_after_a_burst_keeps_the_budget_and_every_answer_recorded(
    two_apis: tuple[httpx.AsyncClient, httpx.AsyncClient], database_url: str, redis_url: str
) -> None:
    first, second = two_apis
    team = await first.post("/admin/teams", json={"name": "budgeted"}, headers=ADMIN)
    assert team.status_code == 201, team.text
    team_id = team.json()["id"]
    budget = await first.post(
        "/admin/budgets",
        json={
            "name": "fifty calls",
            "scope": "team",
            "scope_id": team_id,
            "period": "daily",
            "hard_limit_micros": 50 * 100,  # each call costs exactly 100 µ$
        },
        headers=ADMIN,
    )
    assert budget.status_code == 201, budget.text
    key = await first.post(
        "/admin/keys", json={"name": "spender", "team_id": team_id}, headers=ADMIN
    )
    assert key.status_code == 201, key.text
    headers = {"Authorization": f"Bearer {key.json()['key']}"}

    async def burst() -> list[int]:
        calls = [
            (first if n % 2 else second).post("/v1/chat/completions", json=CALL, headers=headers)
            for n in range(200)
        ]
        return [r.status_code for r in await asyncio.gather(*calls)]

    before = await burst()
    # Redis restarts empty: counters, reservations and anything else it held are gone.
    emptied = aioredis.Redis.from_url(redis_url)
    await emptied.flushdb()
    await emptied.aclose()
    started = time.monotonic()
    after = await burst()
    assert before.count(200) == 50 and after.count(200) == 0, (before.count(200), after)
    assert set(before + after) == {200, 402}
    assert time.monotonic() - started < 20
    with psycopg.connect(database_url) as conn:
        (records, spent) = conn.execute(
            "SELECT count(*), coalesce(sum(cost_micros), 0) FROM usage_records"
        ).fetchone() or (0, 0)
        (charged,) = conn.execute("SELECT current_usage_micros FROM budgets").fetchone() or (0,)
    assert records == 50 and spent == 50 * 100
    assert charged == spent  # the spend the counters were rebuilt from is every answered call
