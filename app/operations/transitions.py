"""The one table of legal status changes for operations, enforced in one place."""

from __future__ import annotations

from app.core.errors import IllegalTransition
from app.operations.entities import Operation, OperationStatus

P, R, C, F, X = (
    OperationStatus.PENDING,
    OperationStatus.RUNNING,
    OperationStatus.COMPLETED,
    OperationStatus.FAILED,
    OperationStatus.CANCELLED,
)

TRANSITIONS: dict[OperationStatus, frozenset[OperationStatus]] = {
    P: frozenset({R, X, F}),  # claimed; cancelled; failed when out of attempts
    R: frozenset({C, F, X, P}),  # finished; cancelled; back to pending to retry or recover
    C: frozenset(),
    F: frozenset({P}),  # an administrator's retry
    X: frozenset(),
}

TERMINAL = frozenset({C, F, X})


def move(operation: Operation, to: OperationStatus) -> Operation:
    """Set `operation.status` to `to`, or raise `IllegalTransition` if the table forbids it."""
    current = OperationStatus(operation.status)
    if to not in TRANSITIONS[current]:
        raise IllegalTransition(
            f"operation '{operation.id}' cannot go from {current.value} to {to.value}"
        )
    operation.status = to
    return operation
