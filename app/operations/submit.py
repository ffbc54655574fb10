"""Adding jobs: a row committed first, its message sent after the commit.

Every submit path (a client's job, a batch's children, a webhook delivery staged with its event)
builds its row here and sends it only once the transaction that holds it has committed; a send
the broker does not take leaves the row for the sweeper (`mark_unsent`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import orjson

from app.core import tracing
from app.core.clock import utcnow
from app.core.errors import InvalidInput
from app.core.ids import new_id
from app.core.jsonvalues import unencodable
from app.operations.entities import Operation, OperationStatus
from app.queue.names import QUEUES, OperationKind
from app.queue.port import JobQueue
from app.storage.mapping import construct
from app.storage.protocol import Storage, UnitOfWork

log = logging.getLogger(__name__)

OPERATION_ID_PREFIX = "op"


@dataclass(frozen=True, slots=True)
class Owner:
    """Who submits or reads jobs: an API key and its team; administrators see every job."""

    key_id: str | None
    team_id: str | None = None
    admin: bool = False


def request_hash(kind: OperationKind, payload: dict[str, Any]) -> str:
    """A fingerprint of what was asked, to tell a retried request from a different one."""
    try:
        canonical = orjson.dumps(
            {"kind": kind.value, "input": payload}, option=orjson.OPT_SORT_KEYS
        )
    except TypeError as exc:  # e.g. an integer past 64 bits, which JSON itself allows
        found = unencodable(payload)
        field = found[0] if found is not None else None
        raise InvalidInput(f"the request cannot be stored as a job: {exc}", param=field) from exc
    return hashlib.sha256(canonical).hexdigest()


class JobSubmitter:
    """Builds job rows and sends them once committed: what every submit path shares."""

    def __init__(self, storage: Storage, queue: JobQueue, *, max_attempts: int = 3) -> None:
        self._storage = storage
        self._queue = queue
        self.max_attempts = max_attempts

    async def submit_in(
        self,
        uow: UnitOfWork,
        *,
        kind: OperationKind,
        input: dict[str, Any],
        owner: Owner,
        max_attempts: int | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Operation:
        """Inside the caller's `uow`: add a pending job, sent once that unit commits."""
        with enqueue_span(kind) as span:
            operation = self.new(kind, input, owner, max_attempts, meta)
            span.set_attribute("gateway.operation.id", operation.id)
            operation.request_hash = request_hash(kind, input)
            await uow.repo(Operation).add(operation)
            self.send_after_commit(uow, [operation])
        return operation

    def new(
        self,
        kind: OperationKind,
        payload: dict[str, Any],
        owner: Owner,
        max_attempts: int | None,
        meta: dict[str, Any] | None,
        *,
        idempotency_key: str | None = None,
        digest: str | None = None,
        status: OperationStatus = OperationStatus.PENDING,
    ) -> Operation:
        now = utcnow()
        return construct(
            Operation,
            id=new_id(OPERATION_ID_PREFIX),
            kind=kind,
            status=status,
            queue=QUEUES.get(kind, "none"),
            owner_key_id=owner.key_id,
            owner_team_id=owner.team_id,
            input=payload,
            max_attempts=max_attempts or self.max_attempts,
            # Counted as sent now: the send follows the commit, and a failed send clears it.
            enqueued_at=now,
            send_count=1,
            meta=meta or {},
            # The current span's context (the enqueue's): the job's run is its child.
            trace_context=tracing.carrier(),
            idempotency_key=idempotency_key,
            request_hash=digest,
            created_at=now,
            updated_at=now,
        )

    def send_after_commit(self, uow: UnitOfWork, operations: list[Operation]) -> None:
        uow.on_commit(lambda: self.send(operations))

    async def send(self, operations: list[Operation]) -> None:
        """Send committed jobs, all at once (on Redis, their sends share a write); one the
        broker does not take is left for the sweeper. Never raises."""
        if len(operations) == 1:
            await self._send_one(operations[0])
            return
        await asyncio.gather(*(self._send_one(operation) for operation in operations))

    async def _send_one(self, operation: Operation) -> None:
        try:
            await self._queue.send(operation.id, OperationKind(operation.kind))
        except Exception:
            log.warning("broker unreachable; job %s left for the sweeper", operation.id)
            await mark_unsent(self._storage, operation.id)


def enqueue_span(kind: OperationKind) -> tracing.SpanHandle:
    """The span of adding a job (its row and its send): the parent of the job's runs."""
    span = tracing.span("job.enqueue", kind="producer")
    span.set_attribute("gateway.operation.kind", kind.value)
    return span


async def mark_unsent(storage: Storage, operation_id: str) -> None:
    """Record that a committed job's message did not reach the broker (the sweeper sends it)."""
    try:
        async with storage.unit_of_work() as uow:
            current = await uow.repo(Operation).get(operation_id)
            if current is not None and current.status == OperationStatus.PENDING:
                current.enqueued_at = None
                await uow.repo(Operation).update(current)
                await uow.commit()
    except Exception:  # the sweeper's stale-send rule covers this too
        log.exception("could not mark job %s as unsent", operation_id)
