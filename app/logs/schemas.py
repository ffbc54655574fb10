"""Execution logs as the admin API shows them."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel

from app.core.schemas import from_entity
from app.logs.entities import ExecutionLog, ExecutionStatus, ExecutionType
from app.storage.protocol import Page


class ExecutionLogRead(BaseModel):
    id: str
    object: Literal["execution_log"] = "execution_log"
    execution_type: ExecutionType
    resource_id: str
    resource_name: str | None
    status: ExecutionStatus
    # Present only when body logging was on when the call ran.
    input: Any
    output: Any
    error: str | None
    cost_micros: int
    input_tokens: int
    output_tokens: int
    execution_time_ms: int
    provider: str | None
    cache_hit: bool
    overhead_ms: float | None
    api_key_id: str | None
    user_id: str | None
    team_id: str | None
    operation_id: str | None
    is_async: bool
    workflow_steps: list[dict[str, Any]]
    created_at: datetime

    @classmethod
    def of(cls, entry: ExecutionLog) -> ExecutionLogRead:
        return from_entity(cls, entry)


class ExecutionLogList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ExecutionLogRead]
    next_cursor: str | None = None

    @classmethod
    def of_page(cls, page: Page[ExecutionLog]) -> ExecutionLogList:
        return cls(data=[ExecutionLogRead.of(e) for e in page.items], next_cursor=page.next_cursor)


class ExecutionLogStats(BaseModel):
    object: Literal["execution_log_stats"] = "execution_log_stats"
    total: int
    by_status: dict[str, int]
    by_type: dict[str, int]
    input_tokens: int
    output_tokens: int
    cost_micros: int
    average_execution_time_ms: float | None
    max_execution_time_ms: int | None
