"""The usage tables: one record per call, daily rollups that outlive them, and budgets."""

from __future__ import annotations

from datetime import date, datetime
from enum import StrEnum

import sqlalchemy as sa

from app.storage.entity import Entity, big, choice, instant, json_list, pk, text


class UsageType(StrEnum):
    CHAT_COMPLETION = "chat_completion"
    EMBEDDING = "embedding"
    WORKFLOW = "workflow"
    KNOWLEDGE_BASE_SEARCH = "knowledge_base_search"


class UsageStatus(StrEnum):
    SUCCESS = "success"
    ERROR = "error"


class BudgetScope(StrEnum):
    GLOBAL = "global"
    TEAM = "team"
    KEY = "key"


class BudgetPeriod(StrEnum):
    DAILY = "daily"
    WEEKLY = "weekly"
    MONTHLY = "monthly"
    TOTAL = "total"


class BudgetStatus(StrEnum):
    ACTIVE = "active"
    WARNING = "warning"
    EXCEEDED = "exceeded"
    PAUSED = "paused"


class UsageRecord(Entity, table=True):
    """One upstream call: who made it, to which model, its tokens, cost and latency."""

    __tablename__ = "usage_records"
    __table_args__ = (
        sa.Index("ix_usage_records_created_at", "created_at"),
        sa.Index("ix_usage_records_api_key_id_created_at", "api_key_id", "created_at"),
        sa.Index("ix_usage_records_team_id_created_at", "team_id", "created_at"),
        sa.Index("ix_usage_records_model_id_created_at", "model_id", "created_at"),
    )

    id: str = pk()
    usage_type: UsageType = choice(UsageType)
    # Plain ids rather than references: usage outlives the keys, teams and models it mentions.
    api_key_id: str | None = text(None, max_length=64)
    team_id: str | None = text(None, max_length=64)
    model_id: str | None = text(None, max_length=64)
    provider: str | None = text(None, max_length=32)
    input_tokens: int = 0
    output_tokens: int = 0
    cost_micros: int = big()
    latency_ms: int = 0
    status: UsageStatus = choice(UsageStatus, UsageStatus.SUCCESS)
    cache_hit: bool = False
    # The gateway's own time in milliseconds, the upstream's excluded, as `x-gateway-overhead-ms`
    # said it (a stream: up to its first chunk); None for a call that failed.
    overhead_ms: float | None = None
    operation_id: str | None = text(None, max_length=64)
    error: str | None = text(None)


class UsageRollup(Entity, table=True):
    """The usage of one day for one key, team and model, kept after the records expire."""

    __tablename__ = "usage_daily"
    __table_args__ = (
        sa.UniqueConstraint(
            "day",
            "api_key_id",
            "team_id",
            "model_id",
            name="uq_usage_daily_day_api_key_id_team_id_model_id",
        ),
        sa.Index("ix_usage_daily_api_key_id_day", "api_key_id", "day"),
        sa.Index("ix_usage_daily_team_id_day", "team_id", "day"),
    )

    id: str = pk()
    day: date  # in UTC
    # "" stands for "none": NULLs never collide in a unique key, so each day would get duplicates.
    api_key_id: str = text("", max_length=64)
    team_id: str = text("", max_length=64)
    model_id: str = text("", max_length=64)
    requests: int = 0
    errors: int = 0
    input_tokens: int = big()
    output_tokens: int = big()
    cost_micros: int = big()


class Budget(Entity, table=True):
    """A spending limit per period for everything, one team or one key, optionally per model."""

    __tablename__ = "budgets"
    __table_args__ = (sa.Index("ix_budgets_scope_scope_id", "scope", "scope_id"),)

    id: str = pk()
    name: str = text(max_length=200)
    description: str | None = text(None)
    scope: BudgetScope = choice(BudgetScope, BudgetScope.GLOBAL)
    scope_id: str | None = text(None, max_length=64)  # the team or key; None when global
    period: BudgetPeriod = choice(BudgetPeriod, BudgetPeriod.MONTHLY)
    hard_limit_micros: int = big()
    soft_limit_micros: int | None = big(None)
    current_usage_micros: int = big()
    status: BudgetStatus = choice(BudgetStatus, BudgetStatus.ACTIVE)
    model_ids: list[str] = json_list()  # empty means every model
    alert_thresholds: list[int] = json_list()  # percentages of the hard limit
    # The thresholds already alerted in this period, so each alert fires once.
    alerts_fired: list[int] = json_list()
    period_start: datetime = instant(default_now=True)
    enabled: bool = True
