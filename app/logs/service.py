"""Execution logs: listing with filters, statistics and retention (they are written with the
usage records, see `app.usage.ledger`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from app.core.clock import utcnow
from app.core.errors import InvalidInput
from app.logs.entities import ExecutionLog, ExecutionStatus, ExecutionType
from app.storage.protocol import Page, Storage, Where, given
from app.storage.reads import read_existing, read_page

log = logging.getLogger(__name__)

_PAGE = 1000


@dataclass(frozen=True, slots=True)
class LogFilter:
    """Which logs a listing or statistic covers."""

    execution_type: ExecutionType | None = None
    status: ExecutionStatus | None = None
    resource_id: str | None = None
    api_key_id: str | None = None
    team_id: str | None = None
    operation_id: str | None = None
    start: datetime | None = None
    end: datetime | None = None

    def where(self) -> list[Where]:
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise InvalidInput("end must be after start", param="end")
        keys = ("execution_type", "status", "resource_id", "api_key_id", "team_id", "operation_id")
        return given(
            *(Where.eq(name, getattr(self, name)) for name in keys),
            Where.ge("created_at", self.start),
            Where.lt("created_at", self.end),
        )


@dataclass
class LogStats:
    """Counts and totals over the logs of a filter."""

    total: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    by_type: dict[str, int] = field(default_factory=dict)
    input_tokens: int = 0
    output_tokens: int = 0
    cost_micros: int = 0
    average_execution_time_ms: float | None = None
    max_execution_time_ms: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "by_status": self.by_status,
            "by_type": self.by_type,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cost_micros": self.cost_micros,
            "average_execution_time_ms": self.average_execution_time_ms,
            "max_execution_time_ms": self.max_execution_time_ms,
        }


class LogService:
    """Reads and expires execution logs."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage

    async def find(
        self, filters: LogFilter, *, limit: int = 50, after: str | None = None
    ) -> Page[ExecutionLog]:
        """Logs matching `filters`, newest first, one cursor page at a time."""
        return await read_page(
            self._storage,
            ExecutionLog,
            *filters.where(),
            order_by=["-created_at"],
            limit=limit,
            after=after,
        )

    async def get(self, log_id: str) -> ExecutionLog:
        return await read_existing(self._storage, ExecutionLog, log_id, "execution log", param="id")

    async def stats(self, filters: LogFilter) -> LogStats:
        """Counts by status and type, token and cost totals and execution times."""
        stats = LogStats()
        elapsed = 0
        after: str | None = None
        async with self._storage.unit_of_work() as uow:
            while True:
                page = await uow.repo(ExecutionLog).find(
                    *filters.where(), order_by=["created_at"], limit=_PAGE, after=after
                )
                for entry in page.items:
                    stats.total += 1
                    status, kind = entry.status.value, entry.execution_type.value
                    stats.by_status[status] = stats.by_status.get(status, 0) + 1
                    stats.by_type[kind] = stats.by_type.get(kind, 0) + 1
                    stats.input_tokens += entry.input_tokens
                    stats.output_tokens += entry.output_tokens
                    stats.cost_micros += entry.cost_micros
                    elapsed += entry.execution_time_ms
                    stats.max_execution_time_ms = max(
                        stats.max_execution_time_ms or 0, entry.execution_time_ms
                    )
                if page.next_cursor is None:
                    break
                after = page.next_cursor
        if stats.total:
            stats.average_execution_time_ms = elapsed / stats.total
        return stats

    async def purge_expired(self, retention_days: int) -> int:
        """Delete logs older than `retention_days`; returns how many."""
        cutoff = utcnow() - timedelta(days=retention_days)
        async with self._storage.unit_of_work() as uow:
            deleted = await uow.repo(ExecutionLog).delete_where(Where.lt("created_at", cutoff))
            await uow.commit()
        if deleted:
            log.info("log retention: deleted %d logs before %s", deleted, cutoff.isoformat())
        return deleted
