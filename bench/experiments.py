"""What experiments cost: the latency a running one adds to a call, and its results query at
a million records.

Run `python -m bench.experiments` (or `... live`, `... results` for one part: `results` needs
the database `live` prepared). Part one starts a raw mock upstream (bench.raw_upstream) and
the gateway as bench.gateway_server sets it up (PostgreSQL, the Redis broker, a team key with
rate limits and a budget), serving two models on that upstream: `bench`, and `bench-ab`, on
which an experiment runs (two variants, one of them changing the temperature; every call
enrolled, assigned by its `user` and recorded). At one connection it alternates the two models
in rounds and prints p50 and p99 of each and the difference (target: at most 0.1 ms added).
Part two inserts 1,000,000 records into another experiment (100 transactions of 10,000), rolls
them up into its totals (as the periodic task does while they arrive; timed), and times its
results query (`ExperimentService.results`: the totals read, the records not yet rolled up
summed, the statistics in Python; target: at most 500 ms), as the median of five runs right
after the roll-up (no VACUUM) and of five with 10,000 records arrived since the last one.

`BENCH_GATEWAY_DATABASE_URL` and `BENCH_GATEWAY_REDIS_URL` choose the database and Redis
database (bench.gateway_server); both are emptied.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from decimal import Decimal
from typing import Any

import aiohttp
import orjson
import psycopg
import redis
import uvloop

from app.access.permissions import KeyPermissions
from app.credentials.entities import Provider
from app.experiments.entities import Metric, TargetKind, UnitKind
from app.experiments.schemas import ExperimentCreate, VariantParams, VariantSpec
from app.models.entities import Model
from app.queue.broker import build_broker
from app.queue.port import DramatiqQueue
from app.services import build_services
from app.storage.factory import build_storage
from bench.gateway import start, verdict, wait_for
from bench.gateway_server import DATABASE_URL, MODEL, REDIS_URL, prepare, settings
from bench.http_clients import free_port, run

AB_MODEL = "bench-ab"
KEY = "gw-bench-experiments-key-0123456789abcdefgh"
CALLS, ROUNDS = 2000, 5
RECORDS = 1_000_000
TAIL = 10_000  # records arrived since the last roll-up (10 s at 1,000 calls/s)
TARGET_ADDED_MS, TARGET_RESULTS_MS = 0.1, 500.0


async def seed() -> None:
    """The experiment model, a key allowed both models, and the two experiments."""
    config = settings()
    storage = build_storage(config)
    client: Any = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        services = build_services(config, storage, DramatiqQueue(build_broker(config)), client)
        async with storage.unit_of_work() as uow:
            await uow.repo(Model).add(
                Model(
                    id=AB_MODEL,
                    name=AB_MODEL,
                    provider=Provider.OPENAI,
                    provider_model=MODEL,
                    credential_id="bench",
                    parameters={"max_retries": 0},
                    input_price_per_million=Decimal("0.15"),
                    output_price_per_million=Decimal("0.60"),
                )
            )
            await uow.commit()
        await services.keys.create_key(
            name="bench-experiments",
            secret=KEY,
            permissions=KeyPermissions(models=[MODEL, AB_MODEL]),
        )
        for experiment_id, target in (("live", AB_MODEL), ("million", MODEL)):
            await services.experiments.create(
                ExperimentCreate(
                    id=experiment_id,
                    name=experiment_id,
                    target_kind=TargetKind.MODEL,
                    target=target,
                    unit=UnitKind.USER,
                    variants=[
                        VariantSpec(id="control", control=True, allocation=50),
                        VariantSpec(
                            id="warm", allocation=50, params=VariantParams(temperature=0.5)
                        ),
                    ],
                    primary_metric=Metric.LATENCY_MS,
                )
            )
        await services.experiments.start("live")
        await services.metering.close()
    finally:
        await client.aclose()
        await storage.close()


async def added_latency(url: str) -> tuple[float, float]:
    """p50 and p99 of `bench-ab` minus those of `bench`, medians over the rounds."""
    headers = {"content-type": "application/json", "authorization": f"Bearer {KEY}"}
    figures: dict[str, list[tuple[float, float, float]]] = {MODEL: [], AB_MODEL: []}
    print(f"{'round':>5} {'model':<10} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        for round_ in range(1, ROUNDS + 1):
            for model in (MODEL, AB_MODEL):
                users = iter(range(10**9))

                async def call(model: str = model, users: Any = users) -> bytes:
                    body = {
                        "model": model,
                        "user": f"user-{next(users) % 500}",
                        "messages": [{"role": "user", "content": "hello there"}],
                    }
                    async with session.post(url, data=orjson.dumps(body), headers=headers) as r:
                        assert r.status == 200, await r.text()
                        return await r.read()

                rps, p50, p99 = await run(call, 1, CALLS)
                figures[model].append((rps, p50, p99))
                print(f"{round_:>5} {model:<10} {rps:>8.0f} {p50:>8.2f} {p99:>8.2f}")

    def median(model: str, index: int) -> float:
        return statistics.median(f[index] for f in figures[model])

    for model in (MODEL, AB_MODEL):
        print(f"median {model:<10} p50 {median(model, 1):.3f} ms   p99 {median(model, 2):.3f} ms")
    return median(AB_MODEL, 1) - median(MODEL, 1), median(AB_MODEL, 2) - median(MODEL, 2)


def records_made() -> int:
    with psycopg.connect(DATABASE_URL) as conn:
        row = conn.execute(
            "SELECT count(*) FROM experiment_records WHERE experiment_id = 'live'"
        ).fetchone()
    return int(row[0]) if row else 0


def insert_records(
    count: int = RECORDS, prefix: str = "bench", *, per_transaction: int = 10_000
) -> None:
    """`count` records of experiment `million`, `per_transaction` a statement (none rolled
    up yet)."""
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        for first in range(1, count + 1, per_transaction):
            _insert(conn, prefix, first, min(count, first + per_transaction - 1))
        if count >= RECORDS:
            conn.execute("ANALYZE experiment_records")


def horizon_passed() -> None:
    """Wait until every record inserted is below the commit horizon (a transaction left
    open elsewhere on the server holds it back)."""
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        for _ in range(600):
            row = conn.execute(
                "SELECT max(commit_stamp) < pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
                " FROM experiment_records"
            ).fetchone()
            if row and row[0]:
                return
            time.sleep(0.1)


def _insert(conn: Any, prefix: str, first: int, last: int) -> None:
    conn.execute(
        """
        INSERT INTO experiment_records (
            created_at, updated_at, version, id, experiment_id, variant_id, source, unit,
            api_key_id, request_id, input_tokens, output_tokens, cost_micros, latency_ms,
            first_token_ms, success, error, feedback_score, feedback_label
        )
        SELECT now(), now(), 1, 'expr-' || %s || '-' || i, 'million',
               CASE WHEN i %% 2 = 0 THEN 'control' ELSE 'warm' END, 'live',
               'user-' || (i %% 50000), 'key', 'req-' || i,
               10 + i %% 90, 20 + i %% 180, 30 * (10 + i %% 90), 200 + (i::int8 * 7919) %% 600,
               CASE WHEN i %% 3 = 0 THEN 50 + i %% 100 END, i %% 50 <> 0,
               CASE WHEN i %% 50 = 0 THEN 'upstream_error: failed' END,
               CASE WHEN i %% 10 = 0 THEN (i %% 5)::float8 END,
               CASE WHEN i %% 10 = 0 THEN CASE WHEN i %% 4 = 0 THEN 'good' ELSE 'bad' END END
        FROM generate_series(%s::int8, %s::int8) AS i
        """,
        (prefix, first, last),
    )


async def results_time() -> tuple[float, float, float]:
    """Seconds to roll up the records inserted (what the periodic task does as they arrive),
    then the median time in ms of five results queries of `million` with every record rolled
    up (no VACUUM), and of five with TAIL records arrived since the last roll-up."""
    config = settings()
    storage = build_storage(config)
    client: Any = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        services = build_services(config, storage, DramatiqQueue(build_broker(config)), client)
        horizon_passed()
        began = time.perf_counter()
        counted = await services.experiments.roll_up()
        rolled = time.perf_counter() - began
        assert counted >= RECORDS, counted  # and the records of experiment `live`
        steady, tailed = [], []
        for _ in range(5):
            began = time.perf_counter()
            results = await services.experiments.results("million")
            steady.append((time.perf_counter() - began) * 1000)
        assert results.total == RECORDS, results.total
        for round_ in range(5):
            await services.experiments.roll_up()  # the periodic task
            insert_records(TAIL, f"tail{round_}")
            began = time.perf_counter()
            results = await services.experiments.results("million")
            tailed.append((time.perf_counter() - began) * 1000)
        assert results.total == RECORDS + 5 * TAIL, results.total
        print("results query ms, all rolled up: " + ", ".join(f"{t:.0f}" for t in steady))
        print(f"results query ms, {TAIL:,} new: " + ", ".join(f"{t:.0f}" for t in tailed))
        await services.metering.close()
        return rolled, statistics.median(steady), statistics.median(tailed)
    finally:
        await client.aclose()
        await storage.close()


def live() -> None:
    ports = {"upstream": free_port(), "gateway": free_port()}
    upstream = f"http://127.0.0.1:{ports['upstream']}"
    prepare(upstream)
    asyncio.run(seed())
    processes = [
        start("bench.raw_upstream", str(ports["upstream"])),
        start("bench.gateway_server", "serve", str(ports["gateway"])),
    ]
    try:
        for port in ports.values():
            wait_for(port)
        url = f"http://127.0.0.1:{ports['gateway']}/v1/chat/completions"
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            added_p50, added_p99 = runner.run(added_latency(url))
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(10)
    print(f"added by the experiment: p50 {added_p50:+.3f} ms   p99 {added_p99:+.3f} ms")
    print(f"target added p50 <= {TARGET_ADDED_MS} ms: {verdict(added_p50 <= TARGET_ADDED_MS)}")
    made = records_made()
    expected = ROUNDS * (CALLS + 50)
    print(f"records of the enrolled calls: {made} of {expected}: {verdict(made == expected)}")


def results() -> None:
    """Needs the database `live` prepared (its experiment `million` is filled here)."""
    began = time.perf_counter()
    insert_records()
    print(f"inserted {RECORDS:,} records in {time.perf_counter() - began:.1f} s")
    rolled, steady, tailed = asyncio.run(results_time())
    print(f"rolled up {RECORDS:,} records in {rolled:.1f} s ({RECORDS / rolled:,.0f} records/s)")
    print(f"results at {RECORDS:,} records: {steady:.0f} ms (median of 5)")
    print(f"results at {RECORDS:,} records and {TAIL:,} not yet rolled up: {tailed:.0f} ms")
    met = max(steady, tailed) <= TARGET_RESULTS_MS
    print(f"target results <= {TARGET_RESULTS_MS:.0f} ms: {verdict(met)}")


def main() -> None:
    print(f"load average before the run: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    parts = sys.argv[1:] or ["live", "results"]
    if "live" in parts:
        live()
    if "results" in parts:
        results()
    print(f"load average after the run: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
