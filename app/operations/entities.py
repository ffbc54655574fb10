"""The Operation table: one row per job, the source of truth for its status and result."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa

# Defined beside the queue of each kind (app.queue sits below the domains).
from app.queue.names import OperationKind
from app.storage.entity import (
    Entity,
    choice,
    instant,
    json_list,
    json_object,
    json_value,
    pk,
    reference,
    text,
)


class OperationStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Operation(Entity, table=True):
    """A job: what to do, who asked, where it stands, and what came of it."""

    __tablename__ = "operations"
    __table_args__ = (
        sa.Index("ix_operations_status_lease_expires_at", "status", "lease_expires_at"),
        sa.Index("ix_operations_status_enqueued_at", "status", "enqueued_at"),
        sa.Index("ix_operations_status_finished_at", "status", "finished_at"),
        sa.Index("ix_operations_owner_key_id_created_at", "owner_key_id", "created_at"),
        sa.Index("ix_operations_kind_status", "kind", "status"),
        sa.UniqueConstraint(
            "owner_key_id", "idempotency_key", name="uq_operations_owner_key_id_idempotency_key"
        ),
    )

    id: str = pk()
    kind: OperationKind = choice(OperationKind)
    status: OperationStatus = choice(OperationStatus, OperationStatus.PENDING)
    queue: str = text(max_length=64)
    owner_key_id: str | None = text(None, max_length=64)
    owner_team_id: str | None = text(None, max_length=64)
    input: dict[str, Any] = json_object()
    result: Any = json_value()
    error_type: str | None = text(None, max_length=64)
    error_message: str | None = text(None)
    progress: dict[str, Any] = json_object()
    attempts: int = 0
    max_attempts: int = 3
    # One entry per attempt: number, worker, started/finished instants, outcome, error.
    attempt_log: list[dict[str, Any]] = json_list()
    lease_owner: str | None = text(None, max_length=128)
    lease_token: str | None = text(None, max_length=64)
    lease_expires_at: datetime | None = instant()
    # Last hand-over to the broker, and how many times it was sent (the sweeper re-sends).
    enqueued_at: datetime | None = instant()
    send_count: int = 0
    run_after: datetime | None = instant()
    started_at: datetime | None = instant()
    finished_at: datetime | None = instant()
    parent_id: str | None = reference("operations.id", nullable=True)
    children_total: int = 0
    children_completed: int = 0
    children_failed: int = 0
    children_cancelled: int = 0
    # How many children were handed to the broker: a parent with a window sends that many at
    # submit and one more as each finishes (`submit_parent`); the rest wait, held.
    children_sent: int = 0
    # Whether the parent, once its last child finishes, runs its own handler (pending again,
    # then claimed as any job) rather than completing with its children's counts.
    runs_after_children: bool = False
    idempotency_key: str | None = text(None, max_length=255)
    request_hash: str | None = text(None, max_length=64)
    meta: dict[str, Any] = json_object()
    # The W3C trace context (`traceparent`) of the span that created the job, so that its run
    # on a worker is that span's child (`app.core.tracing`); empty while tracing is off.
    trace_context: dict[str, str] = json_object()
