"""Submitting, reading, cancelling and retrying jobs: the client side of the job engine."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from app.core.clock import utcnow
from app.core.errors import Conflict, DuplicateKey, InvalidInput, NotFound, StaleVersion
from app.core.events import EventSink
from app.core.ids import check_prefixed
from app.operations.entities import Operation, OperationStatus
from app.operations.events import emit_finished
from app.operations.submit import (
    OPERATION_ID_PREFIX,
    JobSubmitter,
    Owner,
    enqueue_span,
    request_hash,
)
from app.operations.transitions import TERMINAL, move, transition
from app.queue.names import OperationKind
from app.queue.port import JobQueue
from app.storage.grouped import GroupInsert
from app.storage.protocol import Increment, Page, Storage, UnitOfWork, Where, given
from app.storage.reads import get_existing, read_page

log = logging.getLogger(__name__)

# How many submit rounds (INSERT, commit, sends) may be under way at once.
SUBMIT_ROUNDS = 4


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """One child job of a fan-out."""

    kind: OperationKind
    input: dict[str, Any]
    meta: dict[str, Any] | None = None


def check_operation_id(value: str, *, param: str = "id") -> str:
    return check_prefixed("operation", OPERATION_ID_PREFIX, value, param=param)


def child_operation_id(parent_id: str, index: int) -> str:
    """The id of a parent's child at `index`: an operation id derived from both (a version 8
    UUID of their BLAKE2b hash), so the next held child is read by its key."""
    raw = bytearray(hashlib.blake2b(f"{parent_id}/{index}".encode(), digest_size=16).digest())
    raw[6] = (raw[6] & 0x0F) | 0x80  # version 8: custom
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 9562 variant
    h = raw.hex()
    return f"{OPERATION_ID_PREFIX}-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def hold(child: Operation) -> None:
    """Mark a pending child as held: committed, not sent, and left alone by the sweeper until
    its parent sends it (`count_child_finished`)."""
    child.enqueued_at = None
    child.send_count = 0


def is_held(operation: Operation) -> bool:
    return operation.status == OperationStatus.PENDING and operation.send_count == 0


class OperationService:
    """Jobs as clients see them: durable on accept, sent after commit, scoped to their owner."""

    def __init__(
        self,
        storage: Storage,
        queue: JobQueue,
        *,
        max_attempts: int = 3,
        events: EventSink | None = None,
    ) -> None:
        self._storage = storage
        self.jobs = JobSubmitter(storage, queue, max_attempts=max_attempts)
        # Submits arriving together share an INSERT (and its commit) and then their sends;
        # a few rounds at a time, so a submit waits for its own round only.
        self._inserts = GroupInsert(
            storage, Operation, in_flight=SUBMIT_ROUNDS, then=self.jobs.send
        )
        self._inserts_unsent = GroupInsert(storage, Operation, in_flight=SUBMIT_ROUNDS)
        # Where `operation.cancelled` goes (the webhooks' sink, which submits its deliveries
        # through a `JobSubmitter` of its own).
        self.events = events

    # ---- submit ----------------------------------------------------------------------------

    async def submit(
        self,
        *,
        kind: OperationKind,
        input: dict[str, Any],
        owner: Owner,
        idempotency_key: str | None = None,
        max_attempts: int | None = None,
        meta: dict[str, Any] | None = None,
        send: bool = True,
    ) -> tuple[Operation, bool]:
        """Commit a pending job and send it; returns the job and whether it is new.

        The same `idempotency_key` with the same input returns the first job; with a different
        input it is a `Conflict`. With `send` False the caller runs the job itself (a synchronous
        workflow run); should it never claim it, the sweeper sends it as it does a lost message.
        """
        digest = request_hash(kind, input)
        if idempotency_key is not None:
            existing = await self._find_idempotent(owner, idempotency_key, digest)
            if existing is not None:
                return existing, False
        with enqueue_span(kind) as span:
            operation = self.jobs.new(
                kind,
                input,
                owner,
                max_attempts,
                meta,
                idempotency_key=idempotency_key,
                digest=digest,
            )
            span.set_attribute("gateway.operation.id", operation.id)
            try:
                # Grouped with concurrent submits: one statement, committed on its own, then
                # the round's sends.
                await (self._inserts if send else self._inserts_unsent).add(operation)
            except DuplicateKey:
                if idempotency_key is None:
                    raise
                # Someone submitted the same key at the same moment; theirs won.
                existing = await self._find_idempotent(owner, idempotency_key, digest)
                if existing is None:
                    raise
                return existing, False
        return operation, True

    async def submit_parent(
        self,
        *,
        kind: OperationKind,
        input: dict[str, Any],
        owner: Owner,
        children: Sequence[ChildSpec],
        meta: dict[str, Any] | None = None,
        attach: Callable[[UnitOfWork, Operation], Awaitable[Any]] | None = None,
        window: int | None = None,
        runs_after_children: bool = False,
    ) -> Operation:
        """Commit a parent with its children in one transaction and send the children.

        The parent runs while its children do. With a `window`, only that many children are
        sent now and the others are held: each child that finishes sends the next, so at most
        `window` of them are queued or running at once, in every worker together. The parent
        finishes when the last child does, or, with `runs_after_children`, goes back to pending
        then and runs its own handler (a summary of what its children did). `attach` writes, in
        the same transaction, what the caller keeps about the parent (a batch row pointing at
        it), so neither exists without the other.
        """
        if not children:
            raise InvalidInput("a parent operation needs at least one child", param="children")
        sent = len(children) if window is None else min(max(window, 1), len(children))
        with enqueue_span(kind) as span:
            now = utcnow()
            # Born running (it is never claimed while its children run), so no status change
            # is made here; one that runs after them has attempts of its own for that run.
            attempts = None if runs_after_children else 1
            parent = self.jobs.new(
                kind, input, owner, attempts, meta, status=OperationStatus.RUNNING
            )
            span.set_attribute("gateway.operation.id", parent.id)
            span.set_attribute("gateway.operation.children", len(children))
            parent.started_at = now
            parent.enqueued_at = None
            parent.send_count = 0
            parent.children_total = len(children)
            parent.children_sent = sent
            parent.runs_after_children = runs_after_children
            kids = [self.jobs.new(c.kind, c.input, owner, None, c.meta) for c in children]
            for index, kid in enumerate(kids):
                # Derived from the position, so the next one to send is found by its key.
                kid.id = child_operation_id(parent.id, index)
                kid.parent_id = parent.id
                if index >= sent:
                    hold(kid)
            async with self._storage.unit_of_work() as uow:
                await uow.repo(Operation).add(parent)
                await uow.repo(Operation).add_many(kids)
                if attach is not None:
                    await attach(uow, parent)
                self.jobs.send_after_commit(uow, kids[:sent])
                await uow.commit()
        return parent

    async def _find_idempotent(self, owner: Owner, key: str, digest: str) -> Operation | None:
        async with self._storage.unit_of_work() as uow:
            page = await uow.repo(Operation).find(
                Where.eq("owner_key_id", owner.key_id), Where.eq("idempotency_key", key), limit=1
            )
        if not page.items:
            return None
        existing = page.items[0]
        if existing.request_hash != digest:
            raise Conflict(
                f"Idempotency-Key '{key}' was already used with a different request",
                param="Idempotency-Key",
            )
        return existing

    # ---- read --------------------------------------------------------------------------------

    async def get(self, operation_id: str, *, owner: Owner) -> Operation:
        """The job, if it exists and the owner may see it (else `NotFound`, never a hint)."""
        check_operation_id(operation_id)
        async with self._storage.unit_of_work() as uow:
            operation = await uow.repo(Operation).get(operation_id)
        if operation is None or not self._visible(operation, owner):
            raise NotFound("operation", operation_id)
        return operation

    async def get_many(self, ids: Sequence[str], *, owner: Owner) -> list[Operation]:
        """The visible jobs among `ids`, in the order asked; unknown ids are left out."""
        for operation_id in ids:
            check_operation_id(operation_id)
        async with self._storage.unit_of_work() as uow:
            found = await uow.repo(Operation).get_many(list(dict.fromkeys(ids)))
        return [o for o in found if self._visible(o, owner)]

    async def wait(self, operation_id: str, *, owner: Owner, timeout: float) -> Operation:  # noqa: ASYNC109
        """The job once finished, or as it stands after `timeout` seconds (long poll)."""
        deadline = asyncio.get_running_loop().time() + timeout
        delay = 0.02
        while True:
            operation = await self.get(operation_id, owner=owner)
            remaining = deadline - asyncio.get_running_loop().time()
            if operation.status in TERMINAL or remaining <= 0:
                return operation
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 1.5, 0.25)

    async def list(
        self,
        *,
        owner: Owner,
        status: OperationStatus | None = None,
        kind: OperationKind | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        parent_id: str | None = None,
        all_owners: bool = False,
        limit: int = 20,
        after: str | None = None,
    ) -> Page[Operation]:
        """A page of jobs, newest first, filtered; `all_owners` only for administrators."""
        where: list[Where] = []
        if not (all_owners and owner.admin):
            where.append(Where.eq("owner_key_id", owner.key_id))
        where += given(
            Where.eq("status", status),
            Where.eq("kind", kind),
            Where.ge("created_at", created_after),
            Where.lt("created_at", created_before),
            Where.eq("parent_id", parent_id),
        )
        return await read_page(
            self._storage, Operation, *where, order_by=["-created_at"], limit=limit, after=after
        )

    @staticmethod
    def _visible(operation: Operation, owner: Owner) -> bool:
        return owner.admin or operation.owner_key_id == owner.key_id

    # ---- cancel and retry ------------------------------------------------------------------

    async def cancel(self, operation_id: str, *, owner: Owner) -> Operation:
        """Cancel a pending or running job (and its unfinished children); finished jobs stay."""
        operation = await self.get(operation_id, owner=owner)
        while True:
            try:
                async with self._storage.unit_of_work() as uow:
                    operation = await cancel_in(
                        uow, operation_id, events=self.events, jobs=self.jobs
                    )
                    await uow.commit()
                return operation
            except StaleVersion:
                continue

    async def retry(self, operation_id: str) -> Operation:
        """Return a failed job to pending with a fresh set of attempts, and send it."""
        check_operation_id(operation_id)
        async with self._storage.unit_of_work() as uow:
            operation = await get_existing(uow.repo(Operation), operation_id, "operation")
            move(operation, OperationStatus.PENDING)
            now = utcnow()
            operation.max_attempts = operation.attempts + self.jobs.max_attempts
            operation.error_type = operation.error_message = None
            operation.finished_at = operation.run_after = None
            operation.enqueued_at = now
            operation.send_count += 1
            operation = await uow.repo(Operation).update(operation)
            self.jobs.send_after_commit(uow, [operation])
            await uow.commit()
        return operation


# The moves of a parent's unfinished children when it is cancelled (checked at import).
_CHILD_CANCELS = (
    transition(OperationStatus.PENDING, OperationStatus.CANCELLED),
    transition(OperationStatus.RUNNING, OperationStatus.CANCELLED),
)
_CHILD_CANCELLED = dict(_CHILD_CANCELS[0].changes)


async def cancel_in(
    uow: UnitOfWork,
    operation_id: str,
    *,
    events: EventSink | None = None,
    jobs: JobSubmitter | None = None,
) -> Operation:
    """Inside `uow`: cancel the job and its unfinished children (held ones included, so none is
    sent), counting them on the parent; a child cancelled alone lets its parent send the next
    (through `jobs`, else the sweeper sends it)."""
    repo = uow.repo(Operation)
    operation = await get_existing(repo, operation_id, "operation")
    if operation.status in TERMINAL:
        if operation.status == OperationStatus.CANCELLED:
            return operation
        raise Conflict(
            f"operation '{operation_id}' already {operation.status.value}; it cannot be cancelled"
        )
    held = is_held(operation)
    now = utcnow()
    move(operation, OperationStatus.CANCELLED)
    operation.finished_at = now
    operation.lease_expires_at = None
    operation.error_type, operation.error_message = "cancelled", "cancelled by request"
    if operation.children_total:
        # One statement for every unfinished child, however many are held.
        operation.children_cancelled += await repo.update_all(
            {**_CHILD_CANCELLED, "finished_at": now, "lease_expires_at": None},
            Where.eq("parent_id", operation.id),
            Where.in_("status", [t.source for t in _CHILD_CANCELS]),
        )
    operation = await repo.update(operation)
    await emit_finished(events, uow, operation)
    if operation.parent_id is not None:
        await count_child_finished(
            uow,
            operation.parent_id,
            OperationStatus.CANCELLED,
            events=events,
            jobs=jobs,
            # A held child took no place in its parent's window, so it frees none.
            release=not held,
        )
    return operation


_COUNTERS = {
    OperationStatus.COMPLETED: "children_completed",
    OperationStatus.FAILED: "children_failed",
    OperationStatus.CANCELLED: "children_cancelled",
}


async def count_child_finished(
    uow: UnitOfWork,
    parent_id: str,
    outcome: OperationStatus,
    *,
    events: EventSink | None = None,
    jobs: JobSubmitter | None = None,
    label: str | None = None,
    release: bool = True,
) -> None:
    """Inside `uow`: count a finished child on its parent (and under `label` in its progress,
    when the child named one: `JobContext.count_as`); send the parent's next held child; the
    last child finishes the parent, or sends it to run its own handler.

    The count is an increment that locks the parent's row, so siblings finishing at once take
    turns, and exactly one of them sees the last count. What it sends goes after the commit
    (through `jobs`; without, the sweeper sends it as a lost message).
    """
    repo = uow.repo(Operation)
    parent = await repo.update_where(parent_id, {_COUNTERS[outcome]: Increment(1)})
    if parent is None:
        return
    done = parent.children_completed + parent.children_failed + parent.children_cancelled
    progress = {**parent.progress, "completed": done, "total": parent.children_total}
    if label is not None:
        progress[label] = int(progress.get(label, 0)) + 1
    parent.progress = progress
    sent: list[Operation] = []
    if done >= parent.children_total and parent.status == OperationStatus.RUNNING:
        if parent.runs_after_children:
            move(parent, OperationStatus.PENDING)
            parent.enqueued_at = utcnow() if jobs is not None else None
            parent.send_count += 1
            sent.append(parent)
        else:
            move(parent, OperationStatus.COMPLETED)
            parent.finished_at = utcnow()
            parent.result = {
                "total": parent.children_total,
                "completed": parent.children_completed,
                "failed": parent.children_failed,
                "cancelled": parent.children_cancelled,
            }
            await emit_finished(events, uow, parent)
    elif release and parent.status == OperationStatus.RUNNING:
        # The next held child, by position; one cancelled meanwhile is passed over.
        while parent.children_sent < parent.children_total:
            index = parent.children_sent
            parent.children_sent += 1
            child = await repo.update_where(
                child_operation_id(parent.id, index),
                {"enqueued_at": utcnow() if jobs is not None else None, "send_count": 1},
                Where.eq("status", OperationStatus.PENDING),
                Where.eq("send_count", 0),
            )
            if child is not None:
                sent.append(child)
                break
    await repo.update(parent)
    if sent and jobs is not None:
        jobs.send_after_commit(uow, sent)
