"""Budgets: administration, period roll-over, spend accounting and threshold alerts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from app.core.clock import utcnow
from app.core.errors import InvalidInput, NotFound, StaleVersion
from app.core.events import EventSink
from app.core.ids import check_prefixed, new_id
from app.core.invalidation import METERING_TOPIC, InvalidationBus
from app.storage.protocol import Increment, Page, Storage, UnitOfWork, Where
from app.usage.entities import Budget, BudgetPeriod, BudgetScope, BudgetStatus
from app.usage.periods import period_end, period_start

DEFAULT_THRESHOLDS = (50, 80, 100)
THRESHOLD_EVENT = "budget.threshold_reached"
EXCEEDED_EVENT = "budget.exceeded"
_WRITE_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class BudgetChanges:
    """The fields an update may change; None leaves a field as it is."""

    name: str | None = None
    description: str | None = None
    hard_limit_micros: int | None = None
    soft_limit_micros: int | None = None
    clear_soft_limit: bool = False
    model_ids: list[str] | None = None
    alert_thresholds: list[int] | None = None
    enabled: bool | None = None


def applies(budget: Budget, *, key_id: str | None, team_id: str | None, model_id: str) -> bool:
    """Whether a call by this key and team to this model counts against `budget`."""
    if not budget.enabled:
        return False
    if budget.model_ids and model_id not in budget.model_ids:
        return False
    if budget.scope is BudgetScope.GLOBAL:
        return True
    if budget.scope is BudgetScope.TEAM:
        return team_id is not None and budget.scope_id == team_id
    return key_id is not None and budget.scope_id == key_id


def roll_if_due(budget: Budget, now: datetime) -> bool:
    """Start a new period when the stored one is over; True when the budget changed."""
    start = period_start(budget.period, now)
    if budget.period is BudgetPeriod.TOTAL or budget.period_start >= start:
        return False
    budget.period_start = start
    budget.current_usage_micros = 0
    budget.alerts_fired = []
    budget.status = BudgetStatus.ACTIVE
    return True


def counter_key(budget: Budget, now: datetime) -> str:
    """The Redis counter of the period containing `now` (a new period gets a fresh counter)."""
    start = period_start(budget.period, now)
    return f"gateway:budget:{budget.id}:{int(start.timestamp())}"


def counter_ttl(budget: Budget, now: datetime) -> int | None:
    """Seconds the counter of the current period must live (None: as long as the budget)."""
    end = period_end(budget.period, period_start(budget.period, now))
    if end is None:
        return None
    return int((end - now).total_seconds()) + 3600


def committed_usage(budget: Budget, now: datetime) -> int:
    """The recorded spend of the current period (0 when the stored period is already over)."""
    if budget.period_start < period_start(budget.period, now):
        return 0
    return budget.current_usage_micros


def _alert_data(budget: Budget, **extra: Any) -> dict[str, Any]:
    return {
        "budget_id": budget.id,
        "name": budget.name,
        "scope": budget.scope.value,
        "scope_id": budget.scope_id,
        "period": budget.period.value,
        "period_start": budget.period_start.isoformat(),
        "usage_micros": budget.current_usage_micros,
        "hard_limit_micros": budget.hard_limit_micros,
        "soft_limit_micros": budget.soft_limit_micros,
        **extra,
    }


def due_alerts(budget: Budget) -> list[tuple[str, dict[str, Any]]]:
    """The alerts `budget`'s usage has reached and that have not fired in this period.

    Marks them fired on `budget`, so saving it in the same unit of work as the events makes
    each alert fire exactly once per period even when several writers race (versions).
    """
    alerts: list[tuple[str, dict[str, Any]]] = []
    usage, hard = budget.current_usage_micros, budget.hard_limit_micros
    for threshold in sorted(set(budget.alert_thresholds)):
        if threshold not in budget.alerts_fired and usage * 100 >= threshold * hard:
            budget.alerts_fired = [*budget.alerts_fired, threshold]
            alerts.append((THRESHOLD_EVENT, _alert_data(budget, threshold_percent=threshold)))
    soft = budget.soft_limit_micros
    if soft is not None and usage >= soft and budget.status is BudgetStatus.ACTIVE:
        budget.status = BudgetStatus.WARNING
        alerts.append((THRESHOLD_EVENT, _alert_data(budget, soft_limit_reached=True)))
    if usage >= hard and budget.status is not BudgetStatus.EXCEEDED:
        budget.status = BudgetStatus.EXCEEDED
        alerts.append((EXCEEDED_EVENT, _alert_data(budget)))
    return alerts


def _check_limits(hard: int, soft: int | None, thresholds: Sequence[int]) -> None:
    if hard < 0:
        raise InvalidInput("hard_limit_micros must be 0 or more", param="hard_limit_micros")
    if soft is not None and not 0 <= soft <= hard:
        raise InvalidInput(
            "soft_limit_micros must be between 0 and hard_limit_micros", param="soft_limit_micros"
        )
    if any(not 1 <= t <= 100 for t in thresholds):
        raise InvalidInput(
            "alert_thresholds are percentages between 1 and 100", param="alert_thresholds"
        )


class BudgetService:
    """Administration of budgets and the accounting of recorded spend against them."""

    def __init__(
        self, storage: Storage, events: EventSink, bus: InvalidationBus | None = None
    ) -> None:
        self._storage = storage
        self.events = events
        self._bus = bus or InvalidationBus(None, shared=False)

    async def _changed(self) -> None:
        """Tell every process's metering to read the budgets again (after the commit, so a
        process that reads at once sees the change)."""
        await self._bus.publish(METERING_TOPIC, "budgets")

    async def create(
        self,
        *,
        name: str,
        scope: BudgetScope,
        scope_id: str | None,
        period: BudgetPeriod,
        hard_limit_micros: int,
        soft_limit_micros: int | None = None,
        model_ids: Sequence[str] = (),
        alert_thresholds: Sequence[int] | None = None,
        description: str | None = None,
        enabled: bool = True,
    ) -> Budget:
        """A new budget, starting its first period now."""
        if scope is BudgetScope.GLOBAL and scope_id is not None:
            raise InvalidInput("a global budget has no scope_id", param="scope_id")
        if scope is not BudgetScope.GLOBAL and not scope_id:
            raise InvalidInput(f"a {scope.value} budget needs a scope_id", param="scope_id")
        thresholds = list(DEFAULT_THRESHOLDS if alert_thresholds is None else alert_thresholds)
        _check_limits(hard_limit_micros, soft_limit_micros, thresholds)
        budget = Budget(
            id=new_id("budget"),
            name=name,
            description=description,
            scope=scope,
            scope_id=scope_id,
            period=period,
            hard_limit_micros=hard_limit_micros,
            soft_limit_micros=soft_limit_micros,
            model_ids=list(model_ids),
            alert_thresholds=sorted(set(thresholds)),
            period_start=period_start(period, utcnow()),
            enabled=enabled,
        )
        async with self._storage.unit_of_work() as uow:
            budget = await uow.repo(Budget).add(budget)
            await uow.commit()
        await self._changed()
        return budget

    async def get(self, budget_id: str) -> Budget:
        """The budget `budget_id`, rolled to the current period for display."""
        check_prefixed("budget", "budget", budget_id)
        async with self._storage.unit_of_work() as uow:
            budget = await uow.repo(Budget).get(budget_id)
        if budget is None:
            raise NotFound("budget", budget_id, param="id")
        roll_if_due(budget, utcnow())
        return budget

    async def find(
        self,
        *,
        scope: BudgetScope | None = None,
        scope_id: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> Page[Budget]:
        """Budgets, newest first, optionally of one scope or scope id."""
        where = []
        if scope is not None:
            where.append(Where.eq("scope", scope))
        if scope_id is not None:
            where.append(Where.eq("scope_id", scope_id))
        async with self._storage.unit_of_work() as uow:
            page = await uow.repo(Budget).find(
                *where, order_by=["-created_at"], limit=limit, after=after
            )
        now = utcnow()
        for budget in page.items:
            roll_if_due(budget, now)
        return page

    async def enabled(self) -> list[Budget]:
        """Every enabled budget (what enforcement checks calls against)."""
        async with self._storage.unit_of_work() as uow:
            page = await uow.repo(Budget).find(Where.eq("enabled", True))
        return page.items

    async def update(self, budget_id: str, changes: BudgetChanges) -> Budget:
        """Apply `changes`; alerts already fired in this period stay fired.

        The usage writer charges spend to the budget meanwhile (a new version), so a stale
        version is applied again on a fresh read rather than answered with a conflict.
        """
        check_prefixed("budget", "budget", budget_id)
        attempts = 0
        while True:
            attempts += 1
            try:
                budget = await self._update_once(budget_id, changes)
            except StaleVersion:
                if attempts >= _WRITE_ATTEMPTS:
                    raise
                continue
            await self._changed()
            return budget

    async def _update_once(self, budget_id: str, changes: BudgetChanges) -> Budget:
        async with self._storage.unit_of_work() as uow:
            repo = uow.repo(Budget)
            budget = await repo.get(budget_id)
            if budget is None:
                raise NotFound("budget", budget_id, param="id")
            roll_if_due(budget, utcnow())
            if changes.name is not None:
                budget.name = changes.name
            if changes.description is not None:
                budget.description = changes.description
            if changes.hard_limit_micros is not None:
                budget.hard_limit_micros = changes.hard_limit_micros
            if changes.clear_soft_limit:
                budget.soft_limit_micros = None
            elif changes.soft_limit_micros is not None:
                budget.soft_limit_micros = changes.soft_limit_micros
            if changes.model_ids is not None:
                budget.model_ids = list(changes.model_ids)
            if changes.alert_thresholds is not None:
                budget.alert_thresholds = sorted(set(changes.alert_thresholds))
            if changes.enabled is not None:
                budget.enabled = changes.enabled
            _check_limits(
                budget.hard_limit_micros, budget.soft_limit_micros, budget.alert_thresholds
            )
            below = budget.current_usage_micros < budget.hard_limit_micros
            if below and budget.status is BudgetStatus.EXCEEDED:
                # A raised limit lifts the block; the alerts of this period stay fired.
                budget.status = BudgetStatus.ACTIVE
            budget = await repo.update(budget)
            await uow.commit()
        return budget

    async def delete(self, budget_id: str) -> None:
        """Remove the budget; calls in every process stop counting against it."""
        check_prefixed("budget", "budget", budget_id)
        async with self._storage.unit_of_work() as uow:
            if not await uow.repo(Budget).delete(budget_id):
                raise NotFound("budget", budget_id, param="id")
            await uow.commit()
        await self._changed()

    async def reset_due(self) -> int:
        """Start the new period of every budget whose period ended; returns how many."""
        now = utcnow()
        rolled = 0
        async with self._storage.unit_of_work() as uow:
            repo = uow.repo(Budget)
            for budget in (await repo.find()).items:
                if roll_if_due(budget, now):
                    await repo.update(budget)
                    rolled += 1
            await uow.commit()
        if rolled:
            await self._changed()
        return rolled

    async def charge(self, uow: UnitOfWork, spend: Mapping[str, int]) -> None:
        """Inside `uow`: add `spend` (micro-dollars by budget id) to the budgets' current
        period, firing the alerts it makes due.

        Each budget is one atomic increment, no read first, so concurrent writers never
        collide on a version; they lock the rows in id order, so they never deadlock either.
        A budget disabled or deleted since the call was admitted is not charged.
        """
        repo = uow.repo(Budget)
        now = utcnow()
        for budget_id in sorted(spend):
            amount = spend[budget_id]
            if amount <= 0:
                continue
            budget = await repo.update_where(
                budget_id,
                {"current_usage_micros": Increment(amount)},
                Where.eq("enabled", True),
            )
            if budget is None:
                continue
            rolled = roll_if_due(budget, now)
            if rolled:  # the stored period is over: this spend is the first of the next
                budget.current_usage_micros = amount
            alerts = due_alerts(budget)
            if not rolled and not alerts:
                continue
            # The increment locked the row until commit: these values cannot have gone stale.
            await repo.update_where(
                budget_id,
                {
                    "period_start": budget.period_start,
                    "current_usage_micros": budget.current_usage_micros,
                    "alerts_fired": budget.alerts_fired,
                    "status": budget.status,
                },
            )
            for event_type, data in alerts:
                await self.events.record(uow, event_type, data)
