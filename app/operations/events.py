"""The `operation.*` events: emitted in the unit of work that finishes a job."""

from __future__ import annotations

from typing import Any

from app.core.events import EventSink
from app.operations.entities import Operation, OperationStatus
from app.queue.names import OperationKind
from app.storage.protocol import UnitOfWork

EVENT_TYPES: dict[OperationStatus, str] = {
    OperationStatus.COMPLETED: "operation.completed",
    OperationStatus.FAILED: "operation.failed",
    OperationStatus.CANCELLED: "operation.cancelled",
}

# Deliveries are jobs too; an event about one would be delivered by another, without end.
SILENT_KINDS = frozenset({OperationKind.WEBHOOK_DELIVERY})
# Kinds whose end is also announced under their own name (`workflow_run.completed`), with the
# same data, so a subscriber can follow them alone.
NAMED_KINDS = frozenset({OperationKind.WORKFLOW_RUN})


def finished_events(kind: OperationKind, status: OperationStatus) -> tuple[str, ...]:
    """The event types that announce a top-level job of `kind` ending in `status`."""
    event_type = EVENT_TYPES.get(status)
    if event_type is None or kind in SILENT_KINDS:
        return ()
    if kind in NAMED_KINDS:
        return event_type, f"{kind.value}.{status.value}"
    return (event_type,)


def operation_data(operation: Operation) -> dict[str, Any]:
    """The `data` of an operation event: the job as `GET /v1/operations/{id}` shows it."""
    status = OperationStatus(operation.status)
    error = None
    if status != OperationStatus.COMPLETED and operation.error_type:
        error = {"type": operation.error_type, "message": operation.error_message or ""}
    return {
        "id": operation.id,
        "object": "operation",
        "kind": OperationKind(operation.kind).value,
        "status": status.value,
        "result": operation.result if status == OperationStatus.COMPLETED else None,
        "error": error,
        "attempts": operation.attempts,
        "owner_key_id": operation.owner_key_id,
        "parent_id": operation.parent_id,
        "created_at": operation.created_at.isoformat(),
        "finished_at": operation.finished_at.isoformat() if operation.finished_at else None,
        "metadata": operation.meta,
    }


async def emit_finished(events: EventSink | None, uow: UnitOfWork, operation: Operation) -> None:
    """Record the event of a job that just finished, unless it is a child or a delivery.

    Children are reported through their parent, so a batch of thousands emits one event.
    """
    kind = OperationKind(operation.kind)
    types = finished_events(kind, OperationStatus(operation.status))
    if events is None or not types or operation.parent_id is not None:
        return
    data = {"operation": operation_data(operation)}
    for event_type in types:
        await events.record(uow, event_type, data)
