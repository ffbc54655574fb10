"""A direct call's usage is committed before settlement returns, many calls per transaction, and
none is lost when the database fails a write or the process shuts down."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import TracebackType
from typing import Any

import pytest
import redis.asyncio as aioredis

from app.core.errors import Unavailable
from app.logs.entities import ExecutionLog
from app.models.entities import Model
from app.storage.entity import Entity
from app.storage.protocol import Repository, Storage, UnitOfWork
from app.usage.entities import BudgetPeriod, BudgetScope, UsageRecord
from app.usage.settlement import UsageOutcome
from app.usage.wiring import Accounting, build_accounting
from tests.usage.conftest import Principal, RecordingLedger, RecordingSink, accounting_settings


class FlakyStorage:
    """A storage whose commits fail while `down` is set (a database that went away) and take
    `delay` seconds (a slow disk), and that counts the commits that succeeded and the most that
    were under way at once."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self.name = storage.name
        self.down = False
        self.delay = 0.0
        self.commits = 0
        self.committing = 0
        self.most_at_once = 0

    def unit_of_work(self, *, autocommit: bool = False) -> UnitOfWork:
        return _FlakyUnit(self, self._storage.unit_of_work(autocommit=autocommit))

    async def check(self) -> None:
        await self._storage.check()

    async def close(self) -> None:
        await self._storage.close()


class _FlakyUnit:
    def __init__(self, owner: FlakyStorage, inner: UnitOfWork) -> None:
        self._owner = owner
        self._inner = inner

    def repo(self, entity_type: type[Any]) -> Repository[Any]:
        return self._inner.repo(entity_type)

    def on_commit(self, callback: Callable[[], Any]) -> None:
        self._inner.on_commit(callback)

    async def commit(self) -> None:
        owner = self._owner
        if owner.down:
            raise Unavailable("the database is unreachable")
        owner.committing += 1
        owner.most_at_once = max(owner.most_at_once, owner.committing)
        try:
            await asyncio.sleep(owner.delay)
            await self._inner.commit()
        finally:
            owner.committing -= 1
        owner.commits += 1

    async def rollback(self) -> None:
        await self._inner.rollback()

    async def __aenter__(self) -> _FlakyUnit:
        await self._inner.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._inner.__aexit__(exc_type, exc, tb)


@pytest.fixture
async def flaky(storage: Storage) -> FlakyStorage:
    return FlakyStorage(storage)


@pytest.fixture
async def flaky_accounting(
    flaky: FlakyStorage, redis: aioredis.Redis, sink: RecordingSink, model: Model
) -> Any:
    settings = accounting_settings(USAGE_RETRY_INTERVAL_SECONDS=0.05)
    built = build_accounting(settings, flaky, redis, sink)
    yield built
    await built.metering.close()


async def count(storage: Storage, entity: type[Entity] = UsageRecord) -> int:
    async with storage.unit_of_work() as uow:
        return await uow.repo(entity).count()


async def call(accounting: Accounting, model: Model, n: int = 0) -> None:
    metering = accounting.metering
    admission = await metering.admit(Principal(f"key-{n % 3}", "team-a"), model, 5, 5)
    await metering.settle(admission, UsageOutcome(input_tokens=5, output_tokens=5))


async def test_a_settled_call_is_committed_when_settlement_returns(
    accounting: Accounting, model: Model, storage: Storage
) -> None:
    await call(accounting, model)
    assert await count(storage) == 1
    assert await count(storage, ExecutionLog) == 1


async def test_calls_settling_together_share_transactions_and_each_is_written_once(
    flaky_accounting: Accounting, flaky: FlakyStorage, model: Model, storage: Storage
) -> None:
    budget = await flaky_accounting.budgets.create(
        name="team",
        scope=BudgetScope.TEAM,
        scope_id="team-a",
        period=BudgetPeriod.MONTHLY,
        hard_limit_micros=10**9,
    )
    before = flaky.commits
    await asyncio.gather(*(call(flaky_accounting, model, n) for n in range(200)))
    assert await count(storage) == 200
    assert await count(storage, ExecutionLog) == 200
    assert flaky.commits - before <= 200 / 4  # many calls per commit
    spent = (await flaky_accounting.budgets.get(budget.id)).current_usage_micros
    assert spent == 200 * (5 * 2 + 5 * 10)  # µ$ at $2/M input and $10/M output


async def test_at_most_the_configured_transactions_run_at_once_and_none_waits_idle(
    flaky: FlakyStorage, redis: aioredis.Redis, sink: RecordingSink, model: Model, storage: Storage
) -> None:
    accounting = build_accounting(accounting_settings(USAGE_WRITES_IN_FLIGHT=3), flaky, redis, sink)
    flaky.delay = 0.02  # a commit takes 20 ms; a call settles every millisecond or so
    calls = []
    try:
        for n in range(300):
            calls.append(asyncio.create_task(call(accounting, model, n)))
            await asyncio.sleep(0.001)
        await asyncio.gather(*calls)
    finally:
        await accounting.metering.close()
    assert await count(storage) == 300
    assert await count(storage, ExecutionLog) == 300
    assert flaky.most_at_once == 3  # the calls kept three transactions busy, never more


async def test_a_failed_write_fails_its_calls_and_their_usage_is_written_once_it_can_be(
    flaky_accounting: Accounting, flaky: FlakyStorage, model: Model, storage: Storage
) -> None:
    flaky.down = True
    outcomes = await asyncio.gather(
        *(call(flaky_accounting, model, n) for n in range(10)), return_exceptions=True
    )
    assert all(isinstance(o, Unavailable) for o in outcomes)  # no answer leaves unrecorded
    assert flaky_accounting.metering.writer.kept == 10
    assert await count(storage) == 0
    flaky.down = False
    for _ in range(100):
        if await count(storage) == 10:
            break
        await asyncio.sleep(0.02)
    assert await count(storage) == 10  # those upstream calls were made: they are paid for
    assert flaky_accounting.metering.writer.kept == 0


async def test_closing_writes_the_usage_a_failed_write_left(
    flaky: FlakyStorage, redis: aioredis.Redis, sink: RecordingSink, model: Model, storage: Storage
) -> None:
    settings = accounting_settings(USAGE_RETRY_INTERVAL_SECONDS=3600)
    accounting = build_accounting(settings, flaky, redis, sink)
    flaky.down = True
    with pytest.raises(Unavailable):
        await call(accounting, model)
    flaky.down = False
    await accounting.metering.close()
    assert await count(storage) == 1


async def test_a_caller_that_goes_away_still_has_its_usage_written(
    accounting: Accounting, model: Model, storage: Storage
) -> None:
    metering = accounting.metering
    ledger = RecordingLedger()
    admission = await metering.admit(Principal("key-gone"), model, 5, 5)
    await metering.settle(admission, UsageOutcome(input_tokens=5, ledger=ledger))
    (usage,) = ledger.calls
    waiting = asyncio.create_task(metering.writer.record(usage))
    await asyncio.sleep(0)  # its usage is on its way
    waiting.cancel()  # the client hung up
    with pytest.raises(asyncio.CancelledError):
        await waiting
    for _ in range(100):
        if await count(storage) == 1:
            break
        await asyncio.sleep(0.01)
    assert await count(storage) == 1
