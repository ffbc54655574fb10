"""Budgets and usage as the admin API shows them."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.storage.protocol import Page
from app.usage.entities import Budget, BudgetPeriod, BudgetScope, BudgetStatus, UsageRecord
from app.usage.periods import period_end

Micros = int
# The column is a signed 64-bit integer.
MAX_MICROS = 2**63 - 1


class BudgetCreate(BaseModel):
    """A new budget; amounts are in micro-dollars (1 USD = 1,000,000)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=2000)
    scope: BudgetScope = BudgetScope.GLOBAL
    scope_id: str | None = Field(default=None, min_length=1, max_length=64)
    period: BudgetPeriod = BudgetPeriod.MONTHLY
    hard_limit_micros: Micros = Field(ge=0, le=MAX_MICROS)
    soft_limit_micros: Micros | None = Field(default=None, ge=0, le=MAX_MICROS)
    model_ids: list[str] = Field(default_factory=list, max_length=100)
    alert_thresholds: list[int] | None = Field(default=None, max_length=20)
    enabled: bool = True


class BudgetUpdate(BaseModel):
    """Changes to a budget; fields left out are kept (`soft_limit_micros: null` removes it)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=2000)
    hard_limit_micros: Micros | None = Field(default=None, ge=0, le=MAX_MICROS)
    soft_limit_micros: Micros | None = Field(default=None, ge=0, le=MAX_MICROS)
    model_ids: list[str] | None = Field(default=None, max_length=100)
    alert_thresholds: list[int] | None = Field(default=None, max_length=20)
    enabled: bool | None = None


class BudgetRead(BaseModel):
    id: str
    object: Literal["budget"] = "budget"
    name: str
    description: str | None
    scope: BudgetScope
    scope_id: str | None
    period: BudgetPeriod
    hard_limit_micros: Micros
    soft_limit_micros: Micros | None
    current_usage_micros: Micros
    status: BudgetStatus
    model_ids: list[str]
    alert_thresholds: list[int]
    alerts_fired: list[int]
    period_start: datetime
    period_end: datetime | None
    enabled: bool
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, budget: Budget) -> BudgetRead:
        return cls(
            **budget.model_dump(exclude={"version"}),
            period_end=period_end(budget.period, budget.period_start),
        )


class BudgetList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BudgetRead]
    next_cursor: str | None = None

    @classmethod
    def of_page(cls, page: Page[Budget]) -> BudgetList:
        return cls(data=[BudgetRead.of(b) for b in page.items], next_cursor=page.next_cursor)


class UsageRecordRead(BaseModel):
    id: str
    usage_type: str
    api_key_id: str | None
    team_id: str | None
    model_id: str | None
    provider: str | None
    input_tokens: int
    output_tokens: int
    cost_micros: Micros
    latency_ms: int
    status: str
    cache_hit: bool
    overhead_ms: float | None
    operation_id: str | None
    error: str | None
    created_at: datetime

    @classmethod
    def of(cls, record: UsageRecord) -> UsageRecordRead:
        return cls.model_validate(record.model_dump(exclude={"version", "updated_at"}))


class UsageRecordList(BaseModel):
    object: Literal["list"] = "list"
    data: list[UsageRecordRead]
    next_cursor: str | None = None


class UsageGroup(BaseModel):
    group: str = Field(description="The key, team or model id, or the day (YYYY-MM-DD).")
    requests: int
    errors: int
    input_tokens: int
    output_tokens: int
    cost_micros: Micros


class UsageSummary(BaseModel):
    object: Literal["usage_summary"] = "usage_summary"
    group_by: str
    start: str
    end: str
    data: list[UsageGroup]
    total: UsageGroup

    @classmethod
    def build(cls, group_by: str, start: str, end: str, rows: list[dict[str, Any]]) -> UsageSummary:
        total = UsageGroup(
            group="total",
            **{
                name: sum(r[name] for r in rows)
                for name in ("requests", "errors", "input_tokens", "output_tokens", "cost_micros")
            },
        )
        return cls(
            group_by=group_by,
            start=start,
            end=end,
            data=[UsageGroup(**r) for r in rows],
            total=total,
        )
