"""`/admin/logs`: execution logs with filters and cursor pages, and their statistics."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query

from app.access.deps import AdminDep
from app.core.provide import provide
from app.core.schemas import PageAfter
from app.logs.entities import ExecutionStatus, ExecutionType
from app.logs.schemas import ExecutionLogList, ExecutionLogRead, ExecutionLogStats
from app.logs.service import LogFilter, LogService

admin_router = APIRouter(prefix="/admin/logs", tags=["admin: execution logs"])

LogsDep = Annotated[LogService, Depends(provide(LogService))]

Id = Annotated[str | None, Query(max_length=64)]


def log_filter(
    execution_type: Annotated[ExecutionType | None, Query(alias="type")] = None,
    status: ExecutionStatus | None = None,
    resource_id: Id = None,
    api_key_id: Id = None,
    team_id: Id = None,
    operation_id: Id = None,
    start: datetime | None = None,
    end: datetime | None = None,
) -> LogFilter:
    return LogFilter(
        execution_type=execution_type,
        status=status,
        resource_id=resource_id,
        api_key_id=api_key_id,
        team_id=team_id,
        operation_id=operation_id,
        start=start,
        end=end,
    )


LogFilterDep = Annotated[LogFilter, Depends(log_filter)]


@admin_router.get("", response_model=ExecutionLogList)
async def list_logs(
    admin: AdminDep,
    logs: LogsDep,
    filters: LogFilterDep,
    limit: int = Query(default=50, ge=1, le=500),
    after: PageAfter = None,
) -> ExecutionLogList:
    """Execution logs, newest first."""
    page = await logs.find(filters, limit=limit, after=after)
    return ExecutionLogList.of_page(page)


@admin_router.get("/stats", response_model=ExecutionLogStats)
async def log_stats(admin: AdminDep, logs: LogsDep, filters: LogFilterDep) -> ExecutionLogStats:
    """Counts by status and type, token and cost totals, execution times."""
    stats = await logs.stats(filters)
    return ExecutionLogStats(**stats.as_dict())


@admin_router.get("/{log_id}", response_model=ExecutionLogRead)
async def get_log(log_id: str, admin: AdminDep, logs: LogsDep) -> ExecutionLogRead:
    """One execution log."""
    return ExecutionLogRead.of(await logs.get(log_id))
