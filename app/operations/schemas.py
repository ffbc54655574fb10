"""Operations as clients read them."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel

from app.core.schemas import ListPage, from_entity
from app.operations.entities import Operation, OperationStatus
from app.queue.names import OperationKind


class OperationError(BaseModel):
    type: str
    message: str


class ChildCounts(BaseModel):
    total: int
    completed: int
    failed: int
    cancelled: int


class OperationRead(BaseModel):
    """A job's public state: never its lease or internal bookkeeping."""

    id: str
    object: Literal["operation"] = "operation"
    kind: OperationKind
    status: OperationStatus
    result: Any = None
    error: OperationError | None = None
    progress: dict[str, Any] = {}
    attempts: int
    max_attempts: int
    attempt_log: list[dict[str, Any]] = []
    parent_id: str | None = None
    children: ChildCounts | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    metadata: dict[str, Any] = {}

    @classmethod
    def of(cls, op: Operation) -> OperationRead:
        error = None
        if op.error_type and op.status in (OperationStatus.FAILED, OperationStatus.CANCELLED):
            error = OperationError(type=op.error_type, message=op.error_message or "")
        children = None
        if op.children_total:
            children = ChildCounts(
                total=op.children_total,
                completed=op.children_completed,
                failed=op.children_failed,
                cancelled=op.children_cancelled,
            )
        return from_entity(
            cls,
            op,
            error=error,
            # Entries are numbered by their place: the first attempt is 1.
            attempt_log=[{"attempt": n, **e} for n, e in enumerate(op.attempt_log, 1)],
            children=children,
            metadata=op.meta,
        )


class OperationList(ListPage[OperationRead]):
    pass
