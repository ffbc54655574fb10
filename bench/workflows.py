"""The workflow engine's own cost: what recording a step and moving on takes, and runs per second.

Run `python -m bench.workflows`. It uses a fresh PostgreSQL database on loopback
(`gateway_bench_workflows`, created, migrated and dropped at the end) and no Redis (the
in-process stand-in). Jobs are executed in this process by an `OperationRunner` over the real
handler, as a worker would, with nothing sent to a broker:

1. overhead per step: runs of 50 `transform` steps (no upstream at all), one after another; each
   step is a checkpoint (its record and the run's progress in one transaction) and a cancellation
   check, so the figure is the engine's overhead per step
2. chat steps: runs of 20 `chat_completion` steps on the built-in mock model (0 ms latency), the
   gateway's call path (permission, admission, metering) included; admission's script runs on
   the in-process Redis stand-in here, slower than a real Redis
3. runs per second: 3-step runs, 16 executed at a time
"""

from __future__ import annotations

import asyncio
import platform
import statistics
import time
from typing import Any

import psycopg
from psycopg import sql

from app.access.service import Principal
from app.config import Settings
from app.core.redis import build_redis
from app.gateway.chat import ensure_builtin_models
from app.operations.runner import OperationRunner
from app.queue.names import OperationKind
from app.services import Services, build_handlers, build_services
from app.storage.factory import build_storage
from app.storage.migrate import upgrade_to_head
from app.workflows.schemas import WorkflowCreate

DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/gateway_bench_workflows"
ADMIN_KEY = "gw-bench-workflows-admin-key-0123456789"
RUNS = 40
STEPS = 50
CHAT_RUNS = 20
CHAT_STEPS = 20
SMALL_RUNS = 400
CONCURRENCY = 16


class NoQueue:
    """Sends nothing: the bench executes each job itself."""

    async def send(self, operation_id: str, kind: OperationKind, *, delay: float = 0.0) -> None:
        return None


def recreate_database() -> None:
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as c:
        c.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier("gateway_bench_workflows")
            )
        )
        c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier("gateway_bench_workflows")))
    upgrade_to_head(DATABASE_URL)


def drop_database() -> None:
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as c:
        c.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier("gateway_bench_workflows")
            )
        )


async def define(services: Services, workflow_id: str, steps: list[dict[str, Any]]) -> None:
    await services.workflows.create(WorkflowCreate(id=workflow_id, name=workflow_id, steps=steps))


async def run_many(
    services: Services,
    runner: OperationRunner,
    principal: Principal,
    workflow_id: str,
    runs: int,
    concurrency: int,
) -> float:
    """Submit and execute `runs` runs, `concurrency` at a time; the seconds it took."""
    gate = asyncio.Semaphore(concurrency)

    async def one(n: int) -> None:
        async with gate:
            operation, _ = await services.workflows.submit(principal, workflow_id, {"n": n})
            assert await runner.execute(operation.id)

    started = time.perf_counter()
    await asyncio.gather(*(one(n) for n in range(runs)))
    return time.perf_counter() - started


async def main() -> None:
    recreate_database()
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        STORAGE_BACKEND="postgres",
        DATABASE_URL=DATABASE_URL,
        BROKER="stub",
        ADMIN_API_KEY=ADMIN_KEY,
        SECRET_KEY="bench-workflows-secret-key-0123456789abcdef",
        LOG_LEVEL="WARNING",
    )
    storage = build_storage(settings)
    redis_client = build_redis(settings)
    services = build_services(settings, storage, NoQueue(), redis_client)
    try:
        await ensure_builtin_models(storage)
        await services.keys.ensure_key(key_id="bench", name="bench", secret=ADMIN_KEY, admin=True)
        principal = await services.keys.authenticate(ADMIN_KEY)
        runner = OperationRunner(storage, NoQueue(), build_handlers(services))
        transform = [
            {"name": f"t{i}", "type": "transform", "value": "${request:n}"} for i in range(STEPS)
        ]
        chat = [
            {
                "name": f"c{i}",
                "type": "chat_completion",
                "model_id": "mock",
                "user_message": "hi ${request:n}",
            }
            for i in range(CHAT_STEPS)
        ]
        await define(services, "transforms", transform)
        await define(services, "chats", chat)
        await define(services, "small", transform[:3])
        await run_many(services, runner, principal, "transforms", 3, 1)  # warm up

        per_run = []
        for _ in range(RUNS):
            per_run.append(await run_many(services, runner, principal, "transforms", 1, 1))
        chat_runs = []
        for _ in range(CHAT_RUNS):
            chat_runs.append(await run_many(services, runner, principal, "chats", 1, 1))
        elapsed = await run_many(services, runner, principal, "small", SMALL_RUNS, CONCURRENCY)
    finally:
        await services.aclose()
        await redis_client.aclose()
        await storage.close()
        drop_database()

    print(f"python {platform.python_version()}, PostgreSQL on loopback, one process")
    median = statistics.median(per_run)
    print(
        f"{STEPS}-step transform run: median {median * 1000:.1f} ms, "
        f"{median / STEPS * 1000:.2f} ms per step (engine overhead, 0 ms upstream)"
    )
    chat_median = statistics.median(chat_runs)
    print(
        f"{CHAT_STEPS}-step chat run (mock, 0 ms): median {chat_median * 1000:.1f} ms, "
        f"{chat_median / CHAT_STEPS * 1000:.2f} ms per step (call path included)"
    )
    print(
        f"3-step runs, {CONCURRENCY} at a time: {SMALL_RUNS / elapsed:.0f} runs/s "
        f"({SMALL_RUNS} runs in {elapsed:.2f} s; submit, claim, 3 records, complete each)"
    )


if __name__ == "__main__":
    asyncio.run(main())
