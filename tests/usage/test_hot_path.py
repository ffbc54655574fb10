"""What keeps metering cheap per call: counter corrections sent with the next admission (or just
after), rows built without entities, and one read per expired cache entry."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import pytest
import redis.asyncio as aioredis

from app.access.entities import ApiKey
from app.core.errors import RateLimited, Unavailable
from app.core.redis_pipe import PipelinedRedis
from app.logs.entities import ExecutionLog, ExecutionType
from app.models.entities import Model
from app.storage.mapping import validate
from app.storage.protocol import Storage
from app.usage import pipeline as pipeline_module
from app.usage.entities import BudgetPeriod, BudgetScope, UsageRecord, UsageStatus, UsageType
from app.usage.metering import Metering, MeteringOptions
from app.usage.settlement import UsageOutcome
from app.usage.wiring import Accounting, build_accounting
from tests.factories import create
from tests.usage.conftest import (
    Principal,
    RecordingLedger,
    RecordingSink,
    accounting_settings,
    redis_broker_settings,
)


async def counter(redis: aioredis.Redis, key: str) -> int:
    return int(await redis.get(key) or 0)


async def limited_key(storage: Storage, key_id: str) -> None:
    async with storage.unit_of_work() as uow:
        await create(
            uow, ApiKey, id=key_id, team_id=None, rate_limits={"tokens_per_minute": 10_000}
        )
        await uow.commit()


async def test_corrections_reach_redis_without_another_call(
    accounting: Accounting, model: Model, storage: Storage, redis: aioredis.Redis
) -> None:
    await limited_key(storage, "key-fix")
    budget = await accounting.budgets.create(
        name="b",
        scope=BudgetScope.KEY,
        scope_id="key-fix",
        period=BudgetPeriod.DAILY,
        hard_limit_micros=10**9,
    )
    admission = await accounting.metering.admit(Principal("key-fix"), model, 100, 900)
    tokens_key = next(key for key, dimension in admission.rate_keys if dimension == "tokens")
    assert await counter(redis, tokens_key) == 1000  # the reservation
    await accounting.metering.settle(admission, UsageOutcome(input_tokens=100, output_tokens=20))
    # Sent in the background right after the call, with no admission to carry it.
    for _ in range(100):
        if await counter(redis, tokens_key) == 120:
            break
        await asyncio.sleep(0.01)
    assert await counter(redis, tokens_key) == 120
    spent = 100 * 2 + 20 * 10  # µ$ at $2/M input and $10/M output
    assert await counter(redis, admission.budget_keys[0]) == spent
    assert budget.id in admission.budget_keys[0]


async def test_the_next_admission_counts_the_corrections_queued_before_it(
    accounting: Accounting, model: Model, storage: Storage
) -> None:
    await limited_key(storage, "key-next")
    metering = accounting.metering
    first = await metering.admit(Principal("key-next"), model, 100, 4900)  # reserves 5000
    await metering.settle(first, UsageOutcome(input_tokens=100, output_tokens=100))
    # No wait: the correction travels ahead of this admission's script.
    second = await metering.admit(Principal("key-next"), model, 100, 4900)
    assert second.headers["x-ratelimit-remaining-tokens"] == str(10_000 - 200 - 5000)


async def test_an_admission_waits_for_corrections_already_on_their_way(
    accounting: Accounting, model: Model, storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    await limited_key(storage, "key-race")
    metering = accounting.metering
    # The corrections go out on their own at once, and take a while to get there.
    monkeypatch.setattr(pipeline_module, "_CORRECTION_DELAY", 0)
    adjust = metering._pipeline._adjust_script

    async def slow_adjust(**kwargs: Any) -> Any:
        await asyncio.sleep(0.05)
        return await adjust(**kwargs)

    slow_adjust.sha = adjust.sha  # type: ignore[attr-defined]  # as admissions send it
    monkeypatch.setattr(metering._pipeline, "_adjust_script", slow_adjust)
    first = await metering.admit(Principal("key-race"), model, 100, 4900)  # reserves 5000
    await metering.settle(first, UsageOutcome(input_tokens=100, output_tokens=100))
    await asyncio.sleep(0.01)  # the correction is on its way
    second = await metering.admit(Principal("key-race"), model, 100, 4900)
    assert second.headers["x-ratelimit-remaining-tokens"] == str(10_000 - 200 - 5000)


async def test_settled_rows_are_the_entities_json(
    accounting: Accounting, model: Model, storage: Storage
) -> None:
    metering = accounting.metering
    admission = await metering.admit(Principal("key-row", "team-row"), model, 10, 10)
    ledger = RecordingLedger()
    await metering.settle(
        admission,
        UsageOutcome(
            input_tokens=7, output_tokens=3, status=UsageStatus.ERROR, error="boom", ledger=ledger
        ),
    )
    (usage,) = ledger.calls
    row, log_row = usage.record, usage.log
    assert row.keys() == UsageRecord(id="x", usage_type=UsageType.EMBEDDING).model_dump().keys()
    blank_log = ExecutionLog(id="x", execution_type=ExecutionType.MODEL, resource_id="m")
    assert log_row.keys() == blank_log.model_dump().keys()
    record, entry = validate(UsageRecord, row), validate(ExecutionLog, log_row)
    assert (record.api_key_id, record.team_id, record.model_id) == ("key-row", "team-row", "priced")
    assert (record.input_tokens, record.output_tokens, record.cost_micros) == (7, 3, 44)
    assert record.status is UsageStatus.ERROR and record.error == "boom"
    assert abs(record.created_at - datetime.now(UTC)).total_seconds() < 5
    assert entry.status.value == "failed" and entry.cost_micros == 44
    async with storage.unit_of_work() as uow:
        await accounting.usage.write_usage(uow, [usage])
        await uow.commit()
    async with storage.unit_of_work() as uow:
        stored = await uow.repo(UsageRecord).get(record.id)
    assert stored is not None and stored.cost_micros == 44


async def test_concurrent_admissions_of_a_key_read_its_limits_once(
    accounting: Accounting, model: Model, storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    await limited_key(storage, "key-crowd")
    metering = accounting.metering
    cache = metering._admission._key_limits
    reads: list[str] = []
    read = cache._load

    async def counted(key_id: str) -> Any:
        reads.append(key_id)
        await asyncio.sleep(0.01)
        return await read(key_id)

    monkeypatch.setattr(cache, "_load", counted)
    admissions = await asyncio.gather(
        *(metering.admit(Principal("key-crowd"), model, 1, 1) for _ in range(20))
    )
    assert len(admissions) == 20 and reads == ["key-crowd"]


async def test_with_a_redis_broker_metering_uses_a_client_of_its_own(
    storage: Storage, redis: aioredis.Redis, redis_url: str, sink: RecordingSink, model: Model
) -> None:
    built = build_accounting(redis_broker_settings(redis_url), storage, redis, sink)
    metering = built.metering
    assert isinstance(metering._redis, PipelinedRedis)
    await limited_key(storage, "key-own")
    admission = await metering.admit(Principal("key-own"), model, 10, 10)
    assert int(await redis.get(admission.rate_keys[0][0]) or 0) == 20  # the same Redis
    await metering.close()


async def test_a_redis_that_does_not_answer_makes_the_call_unavailable_in_time(
    storage: Storage, sink: RecordingSink, model: Model
) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(-1)  # accepts commands, never answers

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = redis_broker_settings(f"redis://127.0.0.1:{port}/0")
    built = build_accounting(settings, storage, aioredis.Redis(port=port), sink)
    metering = Metering(
        storage,
        built.metering._redis,  # the pipelined client of its own
        built.budgets,
        built.metering.writer,
        built.usage,
        MeteringOptions(redis_timeout=0.2),
    )
    await limited_key(storage, "key-silent")
    started = time.monotonic()
    with pytest.raises(Unavailable):
        await metering.admit(Principal("key-silent"), model, 10, 10)
    assert time.monotonic() - started < 2
    await metering._redis.aclose()
    server.close()


async def test_admissions_of_one_turn_share_a_pipeline_and_still_hold_the_limit(
    accounting: Accounting, model: Model, storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with storage.unit_of_work() as uow:
        await create(uow, ApiKey, id="key-burst", team_id=None, rate_limits={"rpm": 10})
        await uow.commit()
    metering = accounting.metering
    pipelines = 0
    original = metering._pipeline._round_trip

    async def counting(*args: Any) -> list[Any]:
        nonlocal pipelines
        pipelines += 1
        return await original(*args)

    monkeypatch.setattr(metering._pipeline, "_round_trip", counting)

    async def call() -> str:
        try:
            await metering.admit(Principal("key-burst"), model, 1, 1)
        except RateLimited:
            return "refused"
        return "admitted"

    results = await asyncio.gather(*(call() for _ in range(30)))
    assert results.count("admitted") == 10
    assert pipelines < 30


async def test_scripts_redis_lost_are_loaded_again(
    accounting: Accounting, model: Model, storage: Storage, redis: aioredis.Redis
) -> None:
    await limited_key(storage, "key-flush")
    metering = accounting.metering
    first = await metering.admit(Principal("key-flush"), model, 100, 100)
    await metering.settle(first, UsageOutcome(input_tokens=100, output_tokens=10))
    await redis.script_flush()  # as after a Redis restart
    second = await metering.admit(Principal("key-flush"), model, 100, 100)  # with the correction
    assert second.headers["x-ratelimit-remaining-tokens"] == str(10_000 - 110 - 200)


async def test_an_admission_refused_before_its_corrections_were_counted_is_asked_again(
    accounting: Accounting, model: Model, storage: Storage, redis: aioredis.Redis
) -> None:
    async with storage.unit_of_work() as uow:
        await create(uow, ApiKey, id="key-late", team_id=None, rate_limits={"tpm": 1000})
        await uow.commit()
    metering = accounting.metering
    await redis.script_flush()  # a fresh Redis: no script loaded yet
    first = await metering.admit(Principal("key-late"), model, 10, None)  # reserves 4106
    await metering.settle(first, UsageOutcome(input_tokens=10, output_tokens=10))
    # The correction rides with this admission, and Redis has no correction script yet: the
    # admission runs first, sees the reservation and refuses, and is asked again.
    second = await metering.admit(Principal("key-late"), model, 10, None)
    tokens_key = next(key for key, dimension in second.rate_keys if dimension == "tokens")
    assert await counter(redis, tokens_key) == 20 + 4106


async def test_a_correction_of_a_reservation_redis_lost_is_not_applied_to_a_rebuilt_counter(
    accounting: Accounting,
    model: Model,
    storage: Storage,
    redis: aioredis.Redis,
    sink: RecordingSink,
) -> None:
    budget = await accounting.budgets.create(
        name="b",
        scope=BudgetScope.GLOBAL,
        scope_id=None,
        period=BudgetPeriod.DAILY,
        hard_limit_micros=10**9,
    )
    metering = accounting.metering
    first = await metering.admit(Principal("key-epoch"), model, 0, 100)  # reserves 1000 µ$
    await redis.flushdb()  # Redis restarts empty: the reservation is gone
    # Settled after the loss: 100 µ$ recorded, a correction of -900 queued for the old counter.
    await metering.settle(first, UsageOutcome(output_tokens=10))
    other = build_accounting(accounting_settings(), storage, redis, sink)  # another process
    second = await other.metering.admit(Principal("key-epoch"), model, 0, 100)
    # Rebuilt from the recorded spend (100), then this call's reservation (1000).
    assert await counter(redis, second.budget_keys[0]) == 1100
    await metering.flush_corrections()
    assert await counter(redis, second.budget_keys[0]) == 1100  # the stale -900 did not apply
    await other.metering.settle(second, UsageOutcome(output_tokens=10))
    await other.metering.flush_corrections()
    assert await counter(redis, second.budget_keys[0]) == 200
    assert (await accounting.budgets.get(budget.id)).current_usage_micros == 200
    await other.metering.close()
