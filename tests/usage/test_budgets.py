"""Budget accounting: threshold alerts once per period, period resets, usage charged once."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from app.core.clock import utcnow
from app.logs.entities import ExecutionLog, ExecutionType
from app.models.entities import Model
from app.storage.protocol import Storage
from app.usage.budgets import BudgetChanges, applies
from app.usage.entities import (
    Budget,
    BudgetPeriod,
    BudgetScope,
    BudgetStatus,
    UsageRecord,
    UsageType,
)
from app.usage.ledger import CallUsage
from app.usage.periods import period_start
from app.usage.settlement import UsageOutcome
from app.usage.wiring import Accounting
from tests.usage.conftest import Principal, RecordingSink

_n = iter(range(10**9))


def spend(micros: int, *, key: str = "key-1", team: str | None = None) -> UsageRecord:
    return UsageRecord(
        id=f"usage-{next(_n)}",
        usage_type=UsageType.CHAT_COMPLETION,
        api_key_id=key,
        team_id=team,
        model_id="priced",
        cost_micros=micros,
    )


async def calls_of(accounting: Accounting, *records: UsageRecord) -> list[CallUsage]:
    """The records as settled calls, charged to every enabled budget they fall under (what
    admission reserves against)."""
    enabled = await accounting.budgets.enabled()
    return [
        CallUsage(
            record.model_dump(mode="json"),
            ExecutionLog(
                id=f"log-{record.id}", execution_type=ExecutionType.MODEL, resource_id="priced"
            ).model_dump(mode="json"),
            tuple(
                b.id
                for b in enabled
                if applies(b, key_id=record.api_key_id, team_id=record.team_id, model_id="priced")
            ),
        )
        for record in records
    ]


async def charge(accounting: Accounting, *records: UsageRecord) -> None:
    await accounting.metering.writer.write(await calls_of(accounting, *records))


async def new_budget(accounting: Accounting, **overrides: object) -> Budget:
    values: dict[str, object] = {
        "name": "monthly",
        "scope": BudgetScope.GLOBAL,
        "scope_id": None,
        "period": BudgetPeriod.DAILY,
        "hard_limit_micros": 1000,
        "soft_limit_micros": 700,
        "alert_thresholds": [50, 80, 100],
    }
    values.update(overrides)
    return await accounting.budgets.create(**values)  # type: ignore[arg-type]


async def test_threshold_alerts_fire_once_each_in_a_period(
    accounting: Accounting, sink: RecordingSink
) -> None:
    budget = await new_budget(accounting)
    await charge(accounting, spend(400))
    assert sink.events == []
    await charge(accounting, spend(200))  # 60 %
    assert [e["threshold_percent"] for e in sink.of_type("budget.threshold_reached")] == [50]
    await charge(accounting, spend(200))  # 80 %, and past the soft limit
    reached = sink.of_type("budget.threshold_reached")
    assert [e.get("threshold_percent") for e in reached] == [50, 80, None]
    assert reached[-1]["soft_limit_reached"] is True
    await charge(accounting, spend(300), spend(50))  # 110 %
    assert len(sink.of_type("budget.exceeded")) == 1
    await charge(accounting, spend(100))
    assert len(sink.of_type("budget.threshold_reached")) == 4
    assert len(sink.of_type("budget.exceeded")) == 1
    stored = await accounting.budgets.get(budget.id)
    assert stored.status is BudgetStatus.EXCEEDED and stored.current_usage_micros == 1250
    assert stored.alerts_fired == [50, 80, 100]


async def test_concurrent_batches_fire_each_alert_exactly_once(
    accounting: Accounting, sink: RecordingSink
) -> None:
    budget = await new_budget(accounting, soft_limit_micros=None)
    await asyncio.gather(*(charge(accounting, spend(100)) for _ in range(12)))
    assert sorted(e["threshold_percent"] for e in sink.of_type("budget.threshold_reached")) == [
        50,
        80,
        100,
    ]
    assert len(sink.of_type("budget.exceeded")) == 1
    assert (await accounting.budgets.get(budget.id)).current_usage_micros == 1200


async def test_a_new_period_resets_usage_and_alerts(
    accounting: Accounting, sink: RecordingSink, storage: Storage
) -> None:
    budget = await new_budget(accounting)
    await charge(accounting, spend(900))
    assert len(sink.events) == 3  # 50 %, 80 %, soft limit
    # Pretend the period started yesterday: the day is over.
    async with storage.unit_of_work() as uow:
        stored = await uow.repo(Budget).get(budget.id)
        assert stored is not None
        stored.period_start = period_start(BudgetPeriod.DAILY, utcnow() - timedelta(days=1))
        await uow.repo(Budget).update(stored)
        await uow.commit()
    assert await accounting.budgets.reset_due() == 1
    assert await accounting.budgets.reset_due() == 0
    reset = await accounting.budgets.get(budget.id)
    assert reset.current_usage_micros == 0 and reset.alerts_fired == []
    assert reset.status is BudgetStatus.ACTIVE
    assert reset.period_start == period_start(BudgetPeriod.DAILY, utcnow())
    await charge(accounting, spend(600))
    assert [e.get("threshold_percent") for _, e in sink.events] == [50, 80, None, 50]


async def test_a_call_is_charged_to_the_budgets_of_its_key_team_and_model_alone(
    accounting: Accounting, model: Model
) -> None:
    team = await new_budget(accounting, scope=BudgetScope.TEAM, scope_id="team-a")
    key = await new_budget(accounting, scope=BudgetScope.KEY, scope_id="key-9")
    other_model = await new_budget(accounting, model_ids=["another-model"])
    metering = accounting.metering
    for principal, output_tokens in (
        (Principal("key-1", "team-a"), 1),
        (Principal("key-9", "team-b"), 2),
        (Principal("key-2"), 4),
    ):
        admission = await metering.admit(principal, model, 0, output_tokens)
        await metering.settle(admission, UsageOutcome(output_tokens=output_tokens))
    assert (await accounting.budgets.get(team.id)).current_usage_micros == 10
    assert (await accounting.budgets.get(key.id)).current_usage_micros == 20
    assert (await accounting.budgets.get(other_model.id)).current_usage_micros == 0


async def test_usage_written_twice_is_stored_and_charged_once(
    accounting: Accounting, storage: Storage
) -> None:
    budget = await new_budget(accounting)
    calls = await calls_of(accounting, spend(100), spend(50))
    for expected in (2, 0):
        async with storage.unit_of_work() as uow:
            assert await accounting.usage.write_usage(uow, calls) == expected
            await uow.commit()
    async with storage.unit_of_work() as uow:
        assert await uow.repo(UsageRecord).count() == 2
        assert await uow.repo(ExecutionLog).count() == 2
    assert (await accounting.budgets.get(budget.id)).current_usage_micros == 150


async def test_a_disabled_budget_is_not_charged_for_calls_admitted_before(
    accounting: Accounting, storage: Storage
) -> None:
    budget = await new_budget(accounting)
    calls = await calls_of(accounting, spend(100))
    await accounting.budgets.update(budget.id, BudgetChanges(enabled=False))
    await accounting.metering.writer.write(calls)
    assert (await accounting.budgets.get(budget.id)).current_usage_micros == 0
