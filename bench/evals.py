"""Throughput of a test run and the evaluation engine's overhead per case.

Run `python -m bench.evals`. In one process, on memory storage and then on PostgreSQL (a fresh
database `gateway_bench_evals`, created, migrated and dropped at the end), with the in-process
broker and the built-in mock model answering at once (0 ms):

1. bare calls: the N chat completions a run makes, through `GatewayCalls` at the run's
   concurrency, with nothing else around them (their usage records and logs written);
2. a run: a suite of N cases with deterministic assertions (contains, regex, is-json,
   levenshtein, latency) submitted over the admin API and executed by the job engine as a
   worker with as many threads as the run's concurrency would: a job per case (claimed, its
   result and usage committed with its outcome, counted on the run's job, the next case's job
   sent), then the run's own job writing the summary.

It prints cases per second of the run, and (run - bare calls) / N: what planning, grading,
each case's job and the run's summary add to each case, in wall time and in this process's CPU
time (steadier on a shared machine; PostgreSQL's own work is not in it).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import httpx
import psycopg

from app.config import Settings
from app.gateway.calls import GatewayCalls, Keyless
from app.gateway.schemas import ChatCompletionRequest
from app.main import create_app
from app.operations.runner import OperationRunner
from app.queue.names import OperationKind
from app.services import Services, build_handlers
from app.storage.memory import MemoryStorage
from app.storage.migrate import upgrade_to_head
from app.storage.protocol import Storage
from app.storage.sql import SqlStorage, make_database

ADMIN = "gw-bench-admin-key-for-evals-0123456789"
DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/gateway_bench_evals"
CASES = 1000
CONCURRENCY = 16
ASSERTIONS = [
    {"type": "contains", "value": "Mock reply"},
    {"type": "regex", "value": r"case \d+$"},
    {"type": "not-is-json"},
    {"type": "levenshtein", "value": "Mock reply to: case 1", "threshold": 10},
    {"type": "latency", "threshold": 5000},
]


class Sent:
    """The jobs handed over, for this process to execute (no broker)."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, operation_id: str, kind: OperationKind, *, delay: float = 0.0) -> None:
        self.sent.append(operation_id)

    async def work(self, runner: OperationRunner, slots: int) -> None:
        """Execute the jobs sent, and those they send, up to `slots` at once, until none is
        left (a worker's threads)."""
        running: set[asyncio.Future[bool]] = set()
        while self.sent or running:
            while self.sent and len(running) < slots:
                running.add(asyncio.ensure_future(runner.execute(self.sent.pop(0))))
            done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()


def case(i: int) -> dict[str, Any]:
    return {"id": f"case-{i}", "input": {"user_message": f"case {i}"}, "assertions": ASSERTIONS}


async def bare_calls(services: Services, cases: int, concurrency: int) -> float:
    calls: GatewayCalls = services.calls
    keyless = Keyless()
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        request = ChatCompletionRequest.model_validate(
            {"model": "mock", "messages": [{"role": "user", "content": f"case {i}"}]}
        )
        async with gate:
            completion = await calls.complete(keyless, request)
            await completion.settle()

    started = time.perf_counter()
    # Each call's usage record and log are committed before it returns.
    await asyncio.gather(*(one(i) for i in range(cases)))
    return time.perf_counter() - started


async def measure(storage: Storage, label: str, cases: int, concurrency: int) -> None:
    queue = Sent()
    settings = Settings(BROKER="stub", ADMIN_API_KEY=ADMIN, LOG_LEVEL="WARNING")
    app = create_app(settings, storage=storage, queue=queue)
    async with app.router.lifespan_context(app):
        services: Services = app.state.services
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport,
            base_url="http://gateway",
            headers={"Authorization": f"Bearer {ADMIN}"},
        ) as http:
            for i in range(cases):
                created = await http.post("/admin/test-cases", json=case(i))
                assert created.status_code == 201, created.text
            suite = {
                "id": "bench",
                "case_ids": [f"case-{i}" for i in range(cases)],
                "default_target": {"type": "model", "model": "mock"},
                "concurrency": concurrency,
            }
            assert (await http.post("/admin/test-suites", json=suite)).status_code == 201
            await bare_calls(services, min(cases, 100), concurrency)  # warm up
            cpu = time.process_time()
            bare = await bare_calls(services, cases, concurrency)
            bare_cpu = time.process_time() - cpu

            runner = OperationRunner(storage, queue, build_handlers(services))
            started, cpu = time.perf_counter(), time.process_time()
            accepted = (await http.post("/admin/test-suites/bench/runs")).json()
            planned = time.perf_counter() - started
            await queue.work(runner, concurrency)
            took, took_cpu = time.perf_counter() - started, time.process_time() - cpu
            run = (await http.get(f"/admin/test-runs/{accepted['id']}")).json()
    assert run["status"] == "completed" and run["progress"]["done"] == cases, run
    print(
        f"{label:>10}: {cases} cases in {took:.2f} s = {cases / took:,.0f} cases/s; "
        f"bare calls {bare:.2f} s; engine overhead {(took - bare) / cases * 1000:.2f} ms/case "
        f"({(took_cpu - bare_cpu) / cases * 1000:.2f} ms of this process's CPU) "
        f"(starting the run {planned * 1000:.0f} ms; concurrency {concurrency}, "
        f"passed {run['progress']['passed']})"
    )


def fresh_database() -> None:
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as c:
        c.execute("DROP DATABASE IF EXISTS gateway_bench_evals WITH (FORCE)")
        c.execute("CREATE DATABASE gateway_bench_evals")
    upgrade_to_head(DATABASE_URL)


def drop_database() -> None:
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as c:
        c.execute("DROP DATABASE IF EXISTS gateway_bench_evals WITH (FORCE)")


async def main(cases: int, concurrency: int, backends: list[str]) -> None:
    if "memory" in backends:
        await measure(MemoryStorage(), "memory", cases, concurrency)
    if "postgres" in backends:
        fresh_database()
        storage = SqlStorage(make_database(DATABASE_URL, pool_size=20, max_overflow=20))
        try:
            await measure(storage, "postgres", cases, concurrency)
        finally:
            await storage.close()
            drop_database()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=CASES)
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY)
    parser.add_argument("--storage", choices=["memory", "postgres"], action="append")
    arguments = parser.parse_args()
    asyncio.run(
        main(arguments.cases, arguments.concurrency, arguments.storage or ["memory", "postgres"])
    )
