"""The execution_logs table: what ran, for whom, with what input, outcome, cost and timing."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import sqlalchemy as sa

from app.storage.entity import Entity, big, choice, json_list, json_value, pk, text


class ExecutionType(StrEnum):
    MODEL = "model"
    WORKFLOW = "workflow"
    CHAT_COMPLETION = "chat_completion"
    EMBEDDING = "embedding"
    INGESTION = "ingestion"
    TEST_CASE = "test_case"


class ExecutionStatus(StrEnum):
    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    SUCCESS = "success"
    FAILED = "failed"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"


class ExecutionLog(Entity, table=True):
    """One execution of a model, workflow, ingestion or test case, kept for a retention period."""

    __tablename__ = "execution_logs"
    __table_args__ = (
        sa.Index("ix_execution_logs_created_at", "created_at"),
        sa.Index(
            "ix_execution_logs_execution_type_status_created_at",
            "execution_type",
            "status",
            "created_at",
        ),
        sa.Index("ix_execution_logs_resource_id_created_at", "resource_id", "created_at"),
    )

    id: str = pk()
    execution_type: ExecutionType = choice(ExecutionType)
    # Plain ids rather than references: a log outlives the resources and keys it mentions.
    resource_id: str = text(max_length=64)
    resource_name: str | None = text(None, max_length=200)
    status: ExecutionStatus = choice(ExecutionStatus, ExecutionStatus.PENDING)
    # Input, output and steps are kept only when the settings allow logging sensitive data.
    input: Any = json_value()
    output: Any = json_value()
    error: str | None = text(None)
    cost_micros: int = big()
    input_tokens: int = 0
    output_tokens: int = 0
    execution_time_ms: int = 0
    # What the answer's headers said: who answered (after any fallback), whether the response
    # cache served it, and the gateway's own time in milliseconds (as on the usage record).
    provider: str | None = text(None, max_length=32)
    cache_hit: bool = False
    overhead_ms: float | None = None
    api_key_id: str | None = text(None, max_length=64)
    user_id: str | None = text(None, max_length=64)
    team_id: str | None = text(None, max_length=64)
    operation_id: str | None = text(None, max_length=64, index=True)
    is_async: bool = False
    workflow_steps: list[dict[str, Any]] = json_list()
