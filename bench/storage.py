"""Throughput and latency of the Operation table through the storage protocol, on each backend.

Run `python -m bench.storage` (or `python bench/storage.py`); `--help` lists the knobs.
PostgreSQL is measured in a database of its own (`gateway_bench` by default) that is created
fresh, migrated, and dropped at the end; nothing else is touched.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import platform
import random
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

from app.operations.entities import Operation, OperationStatus
from app.queue.names import OperationKind
from app.storage.mapping import table_info
from app.storage.memory import MemoryStorage
from app.storage.migrate import upgrade_to_head
from app.storage.protocol import Storage, Where
from app.storage.sql import SqlStorage, make_database

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/gateway_bench"
BACKENDS = ("memory", "postgres")
BATCH = 100  # inserts per unit of work in the batched variant
OWNERS = 50  # API keys the rows are spread over
PAGE = 20  # the page size of the measured `find`

# Prompts and answers are slices of this text, a few hundred characters to a couple of thousand.
PROSE = (
    "Summarise the following support conversation for the on-call engineer, keeping every "
    "error code, the customer's plan and the steps already tried. The customer reports that "
    "streaming completions stop after roughly thirty seconds when the upstream provider is "
    "slow, that retries sometimes produce duplicate webhook deliveries, and that the usage "
    "dashboard lags behind the invoices by a day. They have rotated their API key twice and "
    "cleared the prompt cache, which did not help. Answer with a short list of likely causes, "
    "what to check first in the logs, and which settings could be changed without a restart. "
) * 4

# One unit of work of a measurement: does unit `i` and returns how many operations it made.
Unit = Callable[[int], Awaitable[int]]


@dataclass(frozen=True)
class Result:
    """One measured row of the table."""

    backend: str
    operation: str
    concurrency: int
    ops: int
    units: int
    planned: int
    seconds: float
    latencies: list[float]  # seconds, one per unit of work

    @property
    def ops_per_second(self) -> float:
        return self.ops / self.seconds

    def percentile_ms(self, q: int) -> float:
        if len(self.latencies) < 2:
            return self.latencies[0] * 1000 if self.latencies else float("nan")
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[q - 1] * 1000


# ---- data -----------------------------------------------------------------------------------


def _excerpt(rng: random.Random, low: int, high: int) -> str:
    length = rng.randint(low, high)
    start = rng.randrange(len(PROSE) - length)
    return PROSE[start : start + length]


def realistic_operation(n: int, rng: random.Random, start: datetime) -> Operation:
    """A chat-completion job as the API stores it: request in, attempt log, result or error."""
    created = start + timedelta(seconds=n * 17 + rng.random())
    finished = created + timedelta(milliseconds=rng.randint(300, 9000))
    status = rng.choices(
        [
            OperationStatus.COMPLETED,
            OperationStatus.FAILED,
            OperationStatus.RUNNING,
            OperationStatus.PENDING,
        ],
        weights=[80, 8, 6, 6],
    )[0]
    model = rng.choice(["mock/echo-1", "openai/gpt-4o-mini", "anthropic/claude-3-5-haiku"])
    request = {
        "model": model,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant. Answer concisely."},
            {"role": "user", "content": _excerpt(rng, 200, 1500)},
        ],
        "temperature": 0.7,
        "max_tokens": 512,
        "stream": False,
        "user": f"user-{rng.randrange(1000)}",
    }
    started = created + timedelta(milliseconds=rng.randint(2, 40))
    attempt: dict[str, Any] = {
        "attempt": 1,
        "worker": f"worker-{rng.getrandbits(48):012x}",
        "started_at": started.isoformat(),
    }
    result: Any = None
    error_type = error_message = None
    if status is OperationStatus.COMPLETED:
        attempt.update(finished_at=finished.isoformat(), outcome="completed")
        prompt_tokens, completion_tokens = rng.randint(20, 400), rng.randint(10, 500)
        result = {
            "id": f"chatcmpl-{rng.getrandbits(96):024x}",
            "object": "chat.completion",
            "created": int(finished.timestamp()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": _excerpt(rng, 100, 2000)},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
    elif status is OperationStatus.FAILED:
        attempt.update(
            finished_at=finished.isoformat(), outcome="failed", error="upstream returned 503"
        )
        error_type, error_message = "provider_unavailable", "The provider answered 503 three times."
    keyed = rng.random() < 0.2
    return Operation.model_validate(
        {
            "id": f"op-{uuid.UUID(int=rng.getrandbits(128), version=4)}",
            "kind": OperationKind.CHAT_COMPLETION,
            "status": status,
            "queue": "chat",
            "owner_key_id": f"key-{rng.randrange(OWNERS):04d}",
            "owner_team_id": f"team-{rng.randrange(5)}",
            "input": request,
            "result": result,
            "error_type": error_type,
            "error_message": error_message,
            "progress": {},
            "attempts": 0 if status is OperationStatus.PENDING else 1,
            "attempt_log": [] if status is OperationStatus.PENDING else [attempt],
            "enqueued_at": created,
            "send_count": 1,
            "started_at": None if status is OperationStatus.PENDING else started,
            "finished_at": finished
            if status in (OperationStatus.COMPLETED, OperationStatus.FAILED)
            else None,
            "idempotency_key": f"idem-{n}" if keyed else None,
            "request_hash": hashlib.sha256(str(request).encode()).hexdigest() if keyed else None,
            "meta": {
                "request_id": f"req-{rng.getrandbits(64):016x}",
                "client": "openai-python/1.51.0",
            },
            "created_at": created,
            "updated_at": finished,
        }
    )


def make_dataset(rows: int, seed: int) -> list[Operation]:
    rng = random.Random(seed)
    start = datetime.now(UTC) - timedelta(seconds=rows * 17)
    return [realistic_operation(n, rng, start) for n in range(rows)]


# ---- the PostgreSQL database of the benchmark ----------------------------------------------


def _admin(url: str) -> tuple[str, str]:
    """The URL of the server's `postgres` database, and the name of the benchmark database."""
    parsed = make_url(url)
    admin = parsed.set(drivername="postgresql", database="postgres")
    return admin.render_as_string(hide_password=False), str(parsed.database)


def recreate_database(url: str) -> str:
    """Drop and create the benchmark database; returns the server's version."""
    admin, name = _admin(url)
    with psycopg.connect(admin, autocommit=True, connect_timeout=3) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return str(conn.info.parameter_status("server_version"))


def drop_database(url: str) -> None:
    admin, name = _admin(url)
    with psycopg.connect(admin, autocommit=True, connect_timeout=3) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


async def empty(storage: Storage) -> None:
    """Remove every operation, bypassing the protocol so no dead rows skew the next phase."""
    if isinstance(storage, SqlStorage):
        with psycopg.connect(storage.database.dsn, autocommit=True) as conn:
            conn.execute(f"TRUNCATE {table_info(Operation).name}")
    elif isinstance(storage, MemoryStorage):
        storage.store.clear()


async def settle(storage: Storage) -> None:
    """Give the planner the statistics a live table has (autovacuum would, a minute later)."""
    if isinstance(storage, SqlStorage):
        with psycopg.connect(storage.database.dsn, autocommit=True) as conn:
            conn.execute(f"ANALYZE {table_info(Operation).name}")


# ---- measuring ------------------------------------------------------------------------------


async def drive(
    backend: str, label: str, concurrency: int, unit: Unit, units: int, budget: float | None
) -> Result:
    """Run units 0..units-1 on `concurrency` tasks, each taking the next one until none is left.

    With a `budget` (seconds), no unit starts after it has run out.
    """
    counter = itertools.count()
    latencies: list[float] = []
    ops = 0
    deadline = None if budget is None else time.perf_counter() + budget

    async def task() -> None:
        nonlocal ops
        for i in counter:
            if i >= units or (deadline is not None and time.perf_counter() > deadline):
                return
            began = time.perf_counter()
            # Not `ops += await …`: that reads `ops` before awaiting and loses other tasks' counts.
            done = await unit(i)
            ops += done
            latencies.append(time.perf_counter() - began)

    began = time.perf_counter()
    await asyncio.gather(*(task() for _ in range(concurrency)))
    seconds = time.perf_counter() - began
    return Result(backend, label, concurrency, ops, len(latencies), units, seconds, latencies)


async def bench_backend(
    name: str,
    storage: Storage,
    dataset: Sequence[Operation],
    concurrency: Sequence[int],
    reads: int,
    budget: float,
) -> list[Result]:
    """Every measurement on one backend, for each concurrency."""
    rng = random.Random(len(dataset))
    ids = [op.id for op in dataset]
    owners = sorted({op.owner_key_id for op in dataset if op.owner_key_id is not None})
    id_picks = [rng.choice(ids) for _ in range(reads)]
    owner_picks = [rng.choice(owners) for _ in range(reads)]

    async def insert_one(i: int) -> int:
        async with storage.unit_of_work() as uow:
            await uow.repo(Operation).add(dataset[i])
            await uow.commit()
        return 1

    async def insert_batch(i: int) -> int:
        chunk = dataset[i * BATCH : (i + 1) * BATCH]
        async with storage.unit_of_work() as uow:
            repo = uow.repo(Operation)
            for item in chunk:
                await repo.add(item)
            await uow.commit()
        return len(chunk)

    async def get(i: int) -> int:
        async with storage.unit_of_work() as uow:
            found = await uow.repo(Operation).get(id_picks[i])
        assert found is not None
        return 1

    async def find(i: int) -> int:
        async with storage.unit_of_work() as uow:
            page = await uow.repo(Operation).find(
                Where.eq("owner_key_id", owner_picks[i]), order_by=["-created_at"], limit=PAGE
            )
        assert page.items
        return 1

    async def count(i: int) -> int:
        async with storage.unit_of_work() as uow:
            await uow.repo(Operation).count(Where.eq("owner_key_id", owner_picks[i]))
        return 1

    # Open every pooled connection first, so no measurement pays for connecting.
    await asyncio.gather(*(storage.check() for _ in range(max(concurrency))))
    batches = -(-len(dataset) // BATCH)
    results: list[Result] = []
    for c in concurrency:
        await empty(storage)
        results.append(await drive(name, "insert", c, insert_one, len(dataset), budget))
        await empty(storage)
        # Never cut short: it loads the rows every read below works on.
        results.append(await drive(name, f"insert x{BATCH}/uow", c, insert_batch, batches, None))
        await settle(storage)
        for label, unit in (
            ("get by id", get),
            (f"find owner -created_at limit {PAGE}", find),
            ("count owner", count),
        ):
            results.append(await drive(name, label, c, unit, reads, budget))
    return results


async def bench_postgres(
    url: str, dataset: Sequence[Operation], concurrency: Sequence[int], reads: int, budget: float
) -> list[Result]:
    """`bench_backend` on a pool with one connection per task (created and closed in this loop)."""
    storage = SqlStorage(make_database(url, pool_size=max(concurrency), max_overflow=0))
    try:
        return await bench_backend("postgres", storage, dataset, concurrency, reads, budget)
    finally:
        await storage.close()


# ---- output ---------------------------------------------------------------------------------


def render(results: Sequence[Result]) -> str:
    header = ("backend", "operation", "concurrency", "ops/s", "p50 ms", "p99 ms")
    rows = [
        (
            r.backend,
            r.operation + ("*" if r.units < r.planned else ""),
            str(r.concurrency),
            f"{r.ops_per_second:,.0f}",
            f"{r.percentile_ms(50):.3f}",
            f"{r.percentile_ms(99):.3f}",
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    right = {2, 3, 4, 5}

    def line(cells: Sequence[str]) -> str:
        return " | ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    out = [line(header), "-+-".join("-" * w for w in widths), *(line(row) for row in rows)]
    cut = [r for r in results if r.units < r.planned]
    notes = [
        f"x{BATCH}/uow: ops/s counts rows; p50/p99 are per unit of work of {BATCH} inserts.",
        *(
            ["memory: its calls never suspend, so concurrent tasks only take turns."]
            if any(r.backend == "memory" and r.concurrency > 1 for r in results)
            else []
        ),
        *(
            f"* {r.backend} {r.operation} c={r.concurrency}: time budget reached after "
            f"{r.units:,} of {r.planned:,} units."
            for r in cut
        ),
    ]
    return "\n".join([*out, "", *notes])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.storage",
        description="Operations/s and latency of the Operation table through the storage protocol.",
    )
    parser.add_argument("--rows", type=int, default=5000, help="rows inserted (default 5000)")
    parser.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=[1, 16],
        metavar="C",
        help="concurrent asyncio tasks, one measurement each (default 1 16)",
    )
    parser.add_argument(
        "--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS), metavar="NAME"
    )
    parser.add_argument(
        "--reads", type=int, default=2000, help="units of work per read measurement (default 2000)"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=6.0,
        help="seconds after which a measurement starts no more units (default 6)",
    )
    parser.add_argument(
        "--database-url",
        default=DEFAULT_DATABASE_URL,
        help="a database of its own: it is dropped, re-created, and dropped at the end",
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.rows < 1 or args.reads < 1 or min(args.concurrency) < 1:
        parser.error("--rows, --reads and --concurrency must be at least 1")
    if "bench" not in str(make_url(args.database_url).database):
        parser.error("--database-url must name a database reserved for benchmarks ('…bench…')")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    dataset = make_dataset(args.rows, args.seed)
    size = sum(len(op.model_dump_json()) for op in dataset) // len(dataset)
    about = [
        f"rows={args.rows:,} (about {size:,} bytes of JSON each), reads={args.reads:,}, "
        f"budget={args.budget:g} s, python {platform.python_version()}"
    ]
    results: list[Result] = []
    for backend in args.backends:
        if backend == "memory":
            results += asyncio.run(
                bench_backend(
                    backend, MemoryStorage(), dataset, args.concurrency, args.reads, args.budget
                )
            )
            continue
        try:
            version = recreate_database(args.database_url)
        except psycopg.OperationalError as exc:
            print(f"PostgreSQL is not reachable for {args.database_url}: {exc}", file=sys.stderr)
            return 1
        try:
            upgrade_to_head(args.database_url)
            about.append(f"postgres {version} at {make_url(args.database_url).render_as_string()}")
            results += asyncio.run(
                bench_postgres(
                    args.database_url, dataset, args.concurrency, args.reads, args.budget
                )
            )
        finally:
            drop_database(args.database_url)
    print("\n".join(about))
    print()
    print(render(results))
    print(f"\ntotal {time.perf_counter() - began:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
