"""Usage: writing calls' records and logs, aggregations, daily roll-ups and retention."""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum
from typing import Any, TypeVar

from app.core.clock import utcnow
from app.core.errors import InvalidInput
from app.logs.entities import ExecutionLog
from app.storage.entity import Entity
from app.storage.mapping import construct
from app.storage.protocol import Page, Storage, UnitOfWork, Where, given
from app.usage.budgets import BudgetService
from app.usage.entities import UsageRecord, UsageRollup, UsageStatus
from app.usage.ledger import CallUsage

log = logging.getLogger(__name__)

E = TypeVar("E", bound=Entity)

_PAGE = 1000
# Days this recent are recomputed by every roll-up (a call settles after it began, a job's
# usage commits with its outcome).
_OPEN_DAYS = 2


class GroupBy(StrEnum):
    KEY = "key"
    TEAM = "team"
    MODEL = "model"
    DAY = "day"


@dataclass
class UsageTotals:
    """The usage of one group."""

    group: str
    requests: int = 0
    errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_micros: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


CSV_COLUMNS = ("group", "requests", "errors", "input_tokens", "output_tokens", "cost_micros")


@dataclass(frozen=True, slots=True)
class UsageFilter:
    """Which usage an aggregation covers: whole UTC days, optionally one key, team or model."""

    start: date
    end: date  # inclusive
    api_key_id: str | None = None
    team_id: str | None = None
    model_id: str | None = None

    def __post_init__(self) -> None:
        if self.end < self.start:
            raise InvalidInput("end must not be before start", param="end")
        if (self.end - self.start).days > 366:
            raise InvalidInput("a usage range spans at most 366 days", param="start")


def day_start(day: date) -> datetime:
    return datetime.combine(day, time.min, tzinfo=UTC)


def to_csv(rows: list[UsageTotals]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow([getattr(row, c) for c in CSV_COLUMNS])
    return out.getvalue()


async def _every(fetch: Callable[[str | None], Awaitable[Page[E]]]) -> AsyncIterator[E]:
    """Every item of a paged `find`, page by page."""
    after: str | None = None
    while True:
        page = await fetch(after)
        for item in page.items:
            yield item
        if page.next_cursor is None:
            return
        after = page.next_cursor


class UsageService:
    """Writes calls' usage and answers aggregations over records and roll-ups."""

    def __init__(self, storage: Storage, budgets: BudgetService) -> None:
        self._storage = storage
        self._budgets = budgets

    async def write_usage(self, uow: UnitOfWork, calls: Sequence[CallUsage]) -> int:
        """Inside `uow`: insert the calls' usage records and execution logs whose ids are new,
        and charge the budgets for the new records; how many records were new.

        Writing the same calls again (a retried transaction, a batch sent twice) inserts and
        charges nothing more.
        """
        if not calls:
            return 0
        # Rows settlement built, validated once, by the repositories (`to_row`).
        records = [construct(UsageRecord, **call.record) for call in calls]
        logs = [construct(ExecutionLog, **call.log) for call in calls]
        new = set(await uow.repo(UsageRecord).add_missing(records))
        await uow.repo(ExecutionLog).add_missing(logs)
        await self.charge_new(uow, calls, new)
        return len(new)

    def usage_rows(self, calls: Sequence[CallUsage]) -> list[Entity]:
        """The calls' usage records and execution logs, to add with a job's outcome."""
        return [
            *(construct(UsageRecord, **call.record) for call in calls),
            *(construct(ExecutionLog, **call.log) for call in calls),
        ]

    async def charge_new(
        self, uow: UnitOfWork, calls: Sequence[CallUsage], new: Collection[Any]
    ) -> None:
        """Inside `uow`: charge each budget the calls were admitted against with the cost of
        those whose usage records were new (their ids in `new`), so a record written again
        charges nothing more."""
        spend: dict[str, int] = {}
        for call in calls:
            cost = int(call.record.get("cost_micros") or 0)
            if cost > 0 and call.record["id"] in new:
                for budget_id in call.budget_ids:
                    spend[budget_id] = spend.get(budget_id, 0) + cost
        await self._budgets.charge(uow, spend)

    async def records(
        self,
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        api_key_id: str | None = None,
        team_id: str | None = None,
        model_id: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> Page[UsageRecord]:
        """Raw records, newest first."""
        where = self._where(start, end, api_key_id, team_id, model_id)
        async with self._storage.unit_of_work() as uow:
            return await uow.repo(UsageRecord).find(
                *where, order_by=["-created_at"], limit=limit, after=after
            )

    @staticmethod
    def _where(
        start: datetime | None,
        end: datetime | None,
        api_key_id: str | None,
        team_id: str | None,
        model_id: str | None,
    ) -> list[Where]:
        return given(
            Where.ge("created_at", start),
            Where.lt("created_at", end),
            Where.eq("api_key_id", api_key_id),
            Where.eq("team_id", team_id),
            Where.eq("model_id", model_id),
        )

    async def aggregate(self, group_by: GroupBy, scope: UsageFilter) -> list[UsageTotals]:
        """Totals per key, team, model or day over `scope`, sorted by group.

        Days already rolled up are read from `usage_daily` (their raw records may have
        expired); the other days from the raw records.
        """
        groups: dict[str, UsageTotals] = {}

        def add(
            group: str | None, *, requests: int, errors: int, tin: int, tout: int, cost: int
        ) -> None:
            totals = groups.setdefault(group or "", UsageTotals(group=group or ""))
            totals.requests += requests
            totals.errors += errors
            totals.input_tokens += tin
            totals.output_tokens += tout
            totals.cost_micros += cost

        rolled: set[date] = set()
        rollup_where = [Where.ge("day", scope.start), Where.le("day", scope.end)]
        for name, value in (
            ("api_key_id", scope.api_key_id),
            ("team_id", scope.team_id),
            ("model_id", scope.model_id),
        ):
            if value is not None:
                rollup_where.append(Where.eq(name, value))
        async with self._storage.unit_of_work() as uow:
            # Which days are rolled up at all, whatever the filter matched.
            day_rows = uow.repo(UsageRollup).find(
                Where.ge("day", scope.start), Where.le("day", scope.end)
            )
            rolled = {r.day for r in (await day_rows).items}
            async for rollup in _every(
                lambda after: uow.repo(UsageRollup).find(
                    *rollup_where, order_by=["day"], limit=_PAGE, after=after
                )
            ):
                add(
                    self._group(
                        group_by, rollup.api_key_id, rollup.team_id, rollup.model_id, rollup.day
                    ),
                    requests=rollup.requests,
                    errors=rollup.errors,
                    tin=rollup.input_tokens,
                    tout=rollup.output_tokens,
                    cost=rollup.cost_micros,
                )
            where = self._where(
                day_start(scope.start),
                day_start(scope.end + timedelta(days=1)),
                scope.api_key_id,
                scope.team_id,
                scope.model_id,
            )
            async for record in _every(
                lambda after: uow.repo(UsageRecord).find(
                    *where, order_by=["created_at"], limit=_PAGE, after=after
                )
            ):
                day = record.created_at.astimezone(UTC).date()
                if day in rolled:
                    continue
                add(
                    self._group(group_by, record.api_key_id, record.team_id, record.model_id, day),
                    requests=1,
                    errors=int(record.status is UsageStatus.ERROR),
                    tin=record.input_tokens,
                    tout=record.output_tokens,
                    cost=record.cost_micros,
                )
        return [groups[k] for k in sorted(groups)]

    @staticmethod
    def _group(
        group_by: GroupBy, key: str | None, team: str | None, model: str | None, day: date
    ) -> str | None:
        if group_by is GroupBy.KEY:
            return key
        if group_by is GroupBy.TEAM:
            return team
        if group_by is GroupBy.MODEL:
            return model
        return day.isoformat()

    async def roll_up_day(self, day: date) -> int:
        """Recompute the roll-ups of `day` from its raw records; returns how many rows."""
        totals: dict[tuple[str, str, str], UsageRollup] = {}
        async with self._storage.unit_of_work() as uow:
            where = [
                Where.ge("created_at", day_start(day)),
                Where.lt("created_at", day_start(day + timedelta(days=1))),
            ]
            async for record in _every(
                lambda after: uow.repo(UsageRecord).find(
                    *where, order_by=["created_at"], limit=_PAGE, after=after
                )
            ):
                group = (record.api_key_id or "", record.team_id or "", record.model_id or "")
                row = totals.get(group)
                if row is None:
                    row = totals[group] = UsageRollup(
                        id=f"usage-{day.isoformat()}-{len(totals)}",
                        day=day,
                        api_key_id=group[0],
                        team_id=group[1],
                        model_id=group[2],
                    )
                row.requests += 1
                row.errors += int(record.status is UsageStatus.ERROR)
                row.input_tokens += record.input_tokens
                row.output_tokens += record.output_tokens
                row.cost_micros += record.cost_micros
            if not totals:
                return 0
            repo = uow.repo(UsageRollup)
            await repo.delete_where(Where.eq("day", day))
            for row in totals.values():
                await repo.add(row)
            await uow.commit()
        return len(totals)

    async def roll_up(self) -> int:
        """Roll up every finished day that still has raw records; returns the rows written."""
        today = utcnow().date()
        async with self._storage.unit_of_work() as uow:
            oldest = await uow.repo(UsageRecord).find(order_by=["created_at"], limit=1)
            if not oldest.items:
                return 0
            first = oldest.items[0].created_at.astimezone(UTC).date()
            rolled_days = {
                r.day
                for r in (
                    await uow.repo(UsageRollup).find(Where.ge("day", first), Where.lt("day", today))
                ).items
            }
        written = 0
        day = first
        while day < today:
            if day not in rolled_days or (today - day).days <= _OPEN_DAYS:
                written += await self.roll_up_day(day)
            day += timedelta(days=1)
        return written

    async def purge_expired(self, retention_days: int) -> int:
        """Roll up, then delete raw records older than `retention_days` (never unrolled days)."""
        await self.roll_up()
        today = utcnow().date()
        cutoff = min(
            utcnow() - timedelta(days=retention_days),
            day_start(today - timedelta(days=_OPEN_DAYS)),
        )
        async with self._storage.unit_of_work() as uow:
            deleted = await uow.repo(UsageRecord).delete_where(Where.lt("created_at", cutoff))
            await uow.commit()
        if deleted:
            log.info("usage retention: deleted %d records before %s", deleted, cutoff.isoformat())
        return deleted
