"""Budget periods: where the current one started and when it ends (UTC calendar)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from app.usage.entities import BudgetPeriod

# A total budget has one period that never ends.
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def period_start(period: BudgetPeriod, now: datetime) -> datetime:
    """The start of the period of kind `period` that contains `now`."""
    day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if period is BudgetPeriod.DAILY:
        return day
    if period is BudgetPeriod.WEEKLY:
        return day - timedelta(days=day.weekday())  # weeks start on Monday, as ISO 8601 says
    if period is BudgetPeriod.MONTHLY:
        return day.replace(day=1)
    return EPOCH


def period_end(period: BudgetPeriod, start: datetime) -> datetime | None:
    """The end of the period starting at `start` (None for a total budget)."""
    if period is BudgetPeriod.DAILY:
        return start + timedelta(days=1)
    if period is BudgetPeriod.WEEKLY:
        return start + timedelta(days=7)
    if period is BudgetPeriod.MONTHLY:
        if start.month == 12:
            return start.replace(year=start.year + 1, month=1)
        return start.replace(month=start.month + 1)
    return None
