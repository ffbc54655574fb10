"""The one table of legal status changes for operations, enforced in one place."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from app.core.errors import IllegalTransition
from app.operations.entities import Operation, OperationStatus
from app.storage.protocol import Where

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


def _check(current: OperationStatus, to: OperationStatus, what: str) -> None:
    if to not in TRANSITIONS[current]:
        raise IllegalTransition(f"{what} cannot go from {current.value} to {to.value}")


def move(operation: Operation, to: OperationStatus) -> Operation:
    """Set `operation.status` to `to`, or raise `IllegalTransition` if the table forbids it."""
    _check(OperationStatus(operation.status), to, f"operation '{operation.id}'")
    operation.status = to
    return operation


@dataclass(frozen=True, slots=True)
class Transition:
    """A status change as a compare-and-set write: the condition on the status, and the change.

    Passing `where` and `changes` to one `update_where` makes the change apply only while the
    job is still in `source`, so of two racing writers exactly one moves it.
    """

    source: OperationStatus
    target: OperationStatus
    where: Where
    changes: Mapping[str, OperationStatus]


def transition(source: OperationStatus, target: OperationStatus) -> Transition:
    """The conditional write from `source` to `target`, or `IllegalTransition` if forbidden.

    Build it once, at import, where the pair is fixed: a forbidden pair then fails at start-up.
    """
    _check(source, target, "an operation")
    return Transition(
        source, target, Where.eq("status", source), MappingProxyType({"status": target})
    )
