"""Running jobs: claim with a lease, heartbeat, write the outcome only while holding the lease.

Also the sweeper, which recovers what crashes and lost messages leave behind.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import httpx

from app.core import tracing
from app.core.clock import utcnow
from app.core.errors import (
    Cancelled,
    DomainError,
    InvalidInput,
    RetryLater,
    StaleVersion,
    Transient,
)
from app.core.events import EventSink
from app.core.log_context import key_id_var, operation_id_var
from app.core.metrics import JOB_ATTEMPTS, JOB_DURATION, JOBS_FINISHED, LEASE_RECOVERIES
from app.operations.entities import Operation, OperationStatus
from app.operations.events import emit_finished, finished_events
from app.operations.presence import WorkerPresence
from app.operations.service import count_child_finished
from app.operations.submit import JobSubmitter, mark_unsent
from app.operations.transitions import TERMINAL, Transition, move, transition
from app.queue.names import OperationKind
from app.queue.port import JobQueue
from app.storage.entity import Entity
from app.storage.protocol import Append, IfNull, Increment, Storage, UnitOfWork, Where

log = logging.getLogger(__name__)

Handler = Callable[["JobContext"], Awaitable[Any]]
# A write inside the transaction of a job's outcome.
Write = Callable[[UnitOfWork], Awaitable[Any]]
# One that follows the rows added with the outcome, told the keys of those that were new.
AfterRows = Callable[[UnitOfWork, Collection[Any]], Awaitable[Any]]

# Every status the runner writes by a conditional update; checked against the table at import.
CLAIM = transition(OperationStatus.PENDING, OperationStatus.RUNNING)
COMPLETE = transition(OperationStatus.RUNNING, OperationStatus.COMPLETED)
FAIL = transition(OperationStatus.RUNNING, OperationStatus.FAILED)
RETRY = transition(OperationStatus.RUNNING, OperationStatus.PENDING)
_RUNNING = Where.eq("status", OperationStatus.RUNNING)


@dataclass(frozen=True)
class JobTimings:
    """How the engine paces leases, retries, re-sends and retention (seconds)."""

    lease: float = 6.0
    heartbeat: float = 2.0
    retry_base: float = 1.0
    retry_max: float = 300.0
    resend_after: float = 3.0
    retention: float = 7 * 24 * 3600.0
    sweep_batch: int = 500
    # A checkpoint this soon after the job was last seen held (claimed, renewed or checked)
    # trusts that: a cancellation is noticed at most this much later, and is never overwritten.
    checkpoint_fresh: float = 0.1


@dataclass
class Claim:
    """A worker's hold on a running job: the token it must show to write the outcome.

    While the claim holds, this worker alone writes the job, so the attempt log and progress
    kept here are the job's own; every write is conditional on the lease token.
    """

    operation_id: str
    token: str
    attempt: int
    attempt_log: list[dict[str, Any]] = field(default_factory=list)
    progress: dict[str, Any] = field(default_factory=dict)
    held_at: float = field(default_factory=time.monotonic)  # when it last was seen held
    lost: bool = False
    # What must commit with this attempt's outcome, and only with it: rows added if new
    # (`add_with_outcome`), what follows them, and other writes (`write_with_outcome`).
    rows: list[Entity] = field(default_factory=list)
    after_rows: list[AfterRows] = field(default_factory=list)
    writes: list[Write] = field(default_factory=list)
    # What a child counts as in its parent's progress once it completes (`count_as`).
    label: str | None = None

    @property
    def transactional(self) -> bool:
        """Whether what commits with the outcome needs a transaction: rows alone go in the
        outcome's own statement."""
        return bool(self.after_rows or self.writes)

    @property
    def carries(self) -> bool:
        """Whether anything must commit with the outcome."""
        return bool(self.rows or self.after_rows or self.writes)

    def held(self, step: Transition | None = None) -> tuple[Where, Where]:
        """The conditions under which the job is still this claim's, and `step` may be taken.

        Without `step` (a heartbeat, progress) the job must merely still be running.
        """
        return (step.where if step else _RUNNING), Where.eq("lease_token", self.token)


@dataclass
class SweepReport:
    recovered: int = 0
    exhausted: int = 0
    resent: int = 0
    purged: int = 0
    errors: list[str] = field(default_factory=list)


class JobContext:
    """What a handler sees of its job: the input, cancellation checkpoints, progress."""

    def __init__(self, runner: OperationRunner, operation: Operation, claim: Claim) -> None:
        self._runner = runner
        self.operation = operation
        self.claim = claim

    @property
    def attempt(self) -> int:
        return self.claim.attempt

    async def checkpoint(self) -> None:
        """Raise `Cancelled` if the job was cancelled or its lease lost; call between steps."""
        claim = self.claim
        if claim.lost:
            raise Cancelled(f"operation '{self.operation.id}' lost its lease")
        if time.monotonic() - claim.held_at < self._runner.timings.checkpoint_fresh:
            return
        async with self._runner.storage.unit_of_work() as uow:
            current = await uow.repo(Operation).get(self.operation.id)
        if not _holds(current, claim):
            claim.lost = True
            raise Cancelled(f"operation '{self.operation.id}' was cancelled")
        claim.held_at = time.monotonic()

    def write_with_outcome(self, write: Write) -> None:
        """Have `write(uow)` run in the transaction that writes this attempt's outcome
        (completed, failed, or pending again to retry), so it commits exactly when the outcome
        does: the usage of the calls the job made, say, which a worker that dies mid-job must
        not lose, nor a job run again count twice.

        An attempt whose outcome is dropped because it lost the job to another attempt drops
        it too; one whose job was cancelled meanwhile still commits it (its calls were made).
        `write` may run more than once, each time in a fresh transaction.
        """
        self.claim.writes.append(write)

    def count_as(self, label: str) -> None:
        """Have the parent of this child count it under `label` in its progress (`passed`,
        say) when this attempt completes it, in the same transaction as the outcome."""
        self.claim.label = label

    def add_with_outcome(self, rows: Sequence[Entity], then: AfterRows | None = None) -> None:
        """Have `rows` (of any entity types) added, those whose keys are new, with this
        attempt's outcome, as `write_with_outcome` has its writes run; `then(uow, new)` runs
        after them in the same transaction, told the keys of the rows that were new (to charge
        a budget once per new usage record, say).

        Rows with no `then` and no other writes cost nothing more than the outcome itself: on
        PostgreSQL they go in the outcome's own statement (`write_where_adding`).
        """
        self.claim.rows.extend(rows)
        if then is not None:
            self.claim.after_rows.append(then)

    async def save(self, write: Callable[[UnitOfWork], Awaitable[Any]], **progress: Any) -> None:
        """Run `write` and record `progress` in one transaction, committed only while the claim
        holds: a job cancelled or taken over meanwhile gets `Cancelled`, and nothing is written.

        What a multi-step job keeps of a finished step goes through here, so a stale worker can
        never record a step, and a recorded step always comes with the progress that counts it.
        """
        claim = self.claim
        if claim.lost:
            raise Cancelled(f"operation '{self.operation.id}' lost its lease")
        merged = {**claim.progress, **progress}
        async with self._runner.storage.unit_of_work() as uow:
            await write(uow)
            held = await uow.repo(Operation).write_where(
                claim.operation_id, {"progress": merged}, *claim.held()
            )
            if not held:
                claim.lost = True
                raise Cancelled(f"operation '{self.operation.id}' was cancelled")
            await uow.commit()
        claim.progress = merged
        claim.held_at = time.monotonic()

    async def set_progress(self, **progress: Any) -> None:
        """Record how far a multi-step job has come (visible to pollers)."""
        self.claim.progress.update(progress)
        await self._runner._write(self.claim, {"progress": dict(self.claim.progress)})


def _counted(operation: Operation, status: str, written: bool) -> bool:
    """Count a job's final attempt and status, once its outcome is written (`written`)."""
    if written:
        JOB_ATTEMPTS(operation.kind, status).inc()
        JOBS_FINISHED(operation.kind, status).inc()
    return written


def _holds(operation: Operation | None, claim: Claim) -> bool:
    return (
        operation is not None
        and operation.status == OperationStatus.RUNNING
        and operation.lease_token == claim.token
    )


def is_transient(exc: BaseException) -> bool:
    """Timeouts, dropped connections, 429 and 5xx are worth another attempt; the rest are not."""
    if isinstance(exc, Transient):
        return True
    if isinstance(exc, DomainError):
        return False
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code == 429 or exc.response.status_code >= 500
    return isinstance(exc, TimeoutError | ConnectionError | httpx.TransportError | OSError)


def describe(exc: BaseException) -> tuple[str, str]:
    """An error's type and a message safe to store (our own errors speak; others are named)."""
    if isinstance(exc, DomainError):
        return exc.code, exc.message
    if isinstance(exc, httpx.HTTPStatusError):
        return "upstream_error", f"upstream answered HTTP {exc.response.status_code}"
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return "timeout", "the job timed out"
    if isinstance(exc, ConnectionError | httpx.TransportError | OSError):
        return "connection_error", f"connection failed ({type(exc).__name__})"
    return "internal_error", f"the job failed with an internal error ({type(exc).__name__})"


class OperationRunner:
    """Executes jobs of every kind through their handlers, and sweeps up after crashes."""

    def __init__(
        self,
        storage: Storage,
        queue: JobQueue,
        handlers: Mapping[OperationKind, Handler],
        *,
        worker_id: str | None = None,
        timings: JobTimings | None = None,
        events: EventSink | None = None,
        presence: WorkerPresence | None = None,
    ) -> None:
        self.storage = storage
        self.events = events
        self.presence = presence  # which workers are alive: their jobs need not wait a lease
        self.queue = queue
        self.handlers = dict(handlers)
        self.worker_id = worker_id or f"worker-{uuid.uuid4().hex[:12]}"
        self.timings = timings or JobTimings()
        # Sends what a finished child lets its parent send: the next held child, or the parent.
        self._jobs = JobSubmitter(storage, queue)

    # ---- execution -------------------------------------------------------------------------

    async def execute(self, operation_id: str) -> bool:
        """Run the job if it can be claimed; False when another delivery already has it.

        Every line logged meanwhile, the handler's included, carries the job's operation id and
        its owner's key id (`app.core.log_format`)."""
        operation_token = operation_id_var.set(operation_id)
        key_token = key_id_var.set(None)
        try:
            return await self._execute(operation_id)
        finally:
            key_id_var.reset(key_token)
            operation_id_var.reset(operation_token)

    async def _execute(self, operation_id: str) -> bool:
        claimed = await self.claim(operation_id)
        if claimed is None:
            return False
        operation, claim = claimed
        key_id_var.set(operation.owner_key_id)
        # A child of the span that created the job (its row keeps that span's context).
        with tracing.job_span("job.run", operation.trace_context) as span:
            span.set_attribute("gateway.operation.id", operation.id)
            span.set_attribute("gateway.operation.kind", operation.kind)
            span.set_attribute("gateway.operation.attempt", claim.attempt)
            outcome = await self._run(operation, claim)
            span.set_attribute("gateway.job.outcome", outcome)
            if outcome not in ("succeeded", "cancelled"):
                span.set_error(outcome)
        return True

    async def _run(self, operation: Operation, claim: Claim) -> str:
        """Run the claimed job's handler and write the outcome; "succeeded", "cancelled", or
        the code of the error the attempt failed with."""
        operation_id = operation.id
        handler = self.handlers.get(OperationKind(operation.kind))
        if handler is None:
            await self._finish_failed(
                operation, claim, "unsupported", f"no worker handles jobs of kind {operation.kind}"
            )
            return "unsupported"
        work = asyncio.ensure_future(handler(JobContext(self, operation, claim)))
        beat = asyncio.ensure_future(self._heartbeat(claim, work))
        started = time.perf_counter()
        try:
            result = await work
        except Cancelled:
            log.info("job %s stopped: cancelled or lease lost", operation_id)
            JOB_ATTEMPTS(operation.kind, "cancelled").inc()
            await self._dropped(claim)
            return "cancelled"
        except asyncio.CancelledError:
            if not claim.lost:
                raise  # the worker is shutting down; the lease runs out and the job is recovered
            log.info("job %s stopped: cancelled or lease lost", operation_id)
            JOB_ATTEMPTS(operation.kind, "cancelled").inc()
            await self._dropped(claim)
            return "cancelled"
        except Exception as exc:
            await self._attempt_failed(operation, claim, exc)
            return describe(exc)[0]
        finally:
            JOB_DURATION(operation.kind).observe(time.perf_counter() - started)
            beat.cancel()
            if not work.done():
                work.cancel()
        log.info("job %s ran", operation_id, extra=_ran("succeeded", started))
        try:
            await self._complete(operation, claim, result)
        except InvalidInput as exc:
            # A result the database refuses (a NUL character, say): running the job again
            # would produce it again, so the job fails now rather than once per attempt.
            log.warning("job %s: its result cannot be stored: %s", operation_id, exc.message)
            await self._finish_failed(
                operation,
                claim,
                "result_not_storable",
                f"the result cannot be stored: {exc.message}",
            )
            return "result_not_storable"
        return "succeeded"

    async def claim(self, operation_id: str) -> tuple[Operation, Claim] | None:
        """Move a pending job to running under a fresh lease, or None if it is not pending.

        One conditional update, committed by itself: it applies only while the job is pending,
        so of two deliveries of one message exactly one claims it.
        """
        now = utcnow()
        token = uuid.uuid4().hex
        # Not durable: a claim lost with a crash of the database leaves the job pending (the
        # sweeper sends it again) and this attempt unable to write its outcome, so the job
        # runs once more; the outcome's durable commit makes the claim before it durable too.
        async with self.storage.unit_of_work(autocommit=True, durable=False) as uow:
            claimed = await uow.repo(Operation).update_where(
                operation_id,
                {
                    **CLAIM.changes,
                    "attempts": Increment(1),
                    "lease_owner": self.worker_id,
                    "lease_token": token,
                    "lease_expires_at": now + timedelta(seconds=self.timings.lease),
                    "started_at": IfNull(now),
                    "attempt_log": Append(
                        ({"worker": self.worker_id, "started_at": now.isoformat()},)
                    ),
                },
                CLAIM.where,
            )
        if claimed is None:
            return None  # claimed by another delivery, finished, cancelled, or unknown
        claim = Claim(
            claimed.id,
            token,
            claimed.attempts,
            attempt_log=[dict(entry) for entry in claimed.attempt_log],
            progress=dict(claimed.progress),
        )
        if claimed.attempts > claimed.max_attempts:
            # Pending jobs always have an attempt left (a failed attempt with none left fails
            # the job); should one not, it fails here rather than run once too often.
            await self._finish_failed(
                claimed,
                claim,
                "max_attempts_exceeded",
                f"gave up after {claimed.max_attempts} of {claimed.max_attempts} attempts: "
                "out of attempts before it could run",
            )
            return None
        return claimed, claim

    async def _heartbeat(self, claim: Claim, work: asyncio.Future[Any]) -> None:
        """Extend the lease while the handler runs; stop the handler if the job went away."""
        while not work.done():
            await asyncio.sleep(self.timings.heartbeat)
            lease = utcnow() + timedelta(seconds=self.timings.lease)
            try:
                held = await self._write(claim, {"lease_expires_at": lease})
            except Exception:
                log.exception("heartbeat of job %s failed; will try again", claim.operation_id)
                continue
            if not held:
                claim.lost = True
                work.cancel()
                return

    async def _write(self, claim: Claim, changes: dict[str, Any]) -> bool:
        """Write `changes` to the job while the claim holds; False if it no longer does.

        Not durable: a lease renewal or a progress count lost with a crash of the database
        costs at most a run again, as the lost claim does."""
        async with self.storage.unit_of_work(autocommit=True, durable=False) as uow:
            written = await uow.repo(Operation).write_where(
                claim.operation_id, changes, *claim.held()
            )
        if not written:
            return False
        claim.held_at = time.monotonic()
        return True

    async def _finish(
        self,
        claim: Claim,
        step: Transition,
        changes: dict[str, Any],
        then: Callable[[UnitOfWork, Operation], Awaitable[Any]] | None = None,
    ) -> bool:
        """Take `step` with `changes` if the claim still holds, then `then` and what the claim
        carries in the same unit.

        Without `then`, and carrying only rows (a job's usage records and logs), it is one
        conditional statement that adds the rows if it applies (`write_where_adding`); with
        more, a transaction (retried whole when what it touches changed meanwhile). The rows
        most contended are locked last, so they are held the shortest time: for a child, its
        parent's (which every sibling's outcome counts on), so `then` comes after the rows and
        writes; for any other job, the rows the writes lock (a budget every job charges), so
        they come after `then`.
        """
        changes = {**changes, **step.changes}
        held = claim.held(step)
        while True:
            try:
                if then is None and not claim.transactional:
                    async with self.storage.unit_of_work(autocommit=True) as uow:
                        repo = uow.repo(Operation)
                        if claim.rows:
                            applied = (
                                await repo.write_where_adding(
                                    claim.operation_id, changes, *held, adding=claim.rows
                                )
                                is not None
                            )
                        else:
                            applied = await repo.write_where(claim.operation_id, changes, *held)
                    if applied:
                        return True
                    await self._dropped(claim)
                    return False
                async with self.storage.unit_of_work() as uow:
                    repo = uow.repo(Operation)
                    written: Operation | None = None
                    new: Collection[Any] = ()
                    if then is None:  # the row need not be read back
                        added = await repo.write_where_adding(
                            claim.operation_id, changes, *held, adding=claim.rows
                        )
                        held_still = added is not None
                        new = added or ()
                    else:
                        written = await repo.update_where(claim.operation_id, changes, *held)
                        held_still = written is not None
                    if not held_still:
                        await uow.rollback()
                        await self._dropped(claim)
                        return False
                    if then is not None and written is not None:
                        new = await _add_rows(uow, claim.rows)
                        last = written.parent_id is not None
                        if not last:
                            await then(uow, written)
                        await _carried(uow, claim, new)
                        if last:
                            await then(uow, written)
                    else:
                        await _carried(uow, claim, new)
                    await uow.commit()
                    return True
            except StaleVersion:
                continue

    async def _dropped(self, claim: Claim) -> None:
        """The outcome of an attempt that no longer holds its job was not written; its writes
        are, alone, when the job was cancelled while this attempt held it (no other attempt
        will make its calls again), and are dropped when another attempt has the job."""
        log.info("job %s: outcome dropped, lease no longer held", claim.operation_id)
        if claim.carries:
            await self._commit_cancelled(claim)

    async def _commit_cancelled(self, claim: Claim) -> None:
        while True:
            try:
                async with self.storage.unit_of_work() as uow:
                    current = await uow.repo(Operation).get(claim.operation_id)
                    if (
                        current is None
                        or current.status != OperationStatus.CANCELLED
                        or current.lease_token != claim.token
                    ):
                        return
                    await _carried(uow, claim, await _add_rows(uow, claim.rows))
                    await uow.commit()
                    return
            except StaleVersion:
                continue

    @staticmethod
    def _closed(
        attempt_log: list[dict[str, Any]], outcome: str, error: str | None = None
    ) -> dict[str, Any]:
        """The changes that end the current attempt: its log entry closed, the lease cleared."""
        entries = [dict(entry) for entry in attempt_log]
        if entries:
            entries[-1].update(finished_at=utcnow().isoformat(), outcome=outcome)
            if error is not None:
                entries[-1]["error"] = error
        return {
            "attempt_log": entries,
            "lease_owner": None,
            "lease_token": None,
            "lease_expires_at": None,
        }

    async def _complete(self, operation: Operation, claim: Claim, result: Any) -> bool:
        changes = {
            **self._closed(claim.attempt_log, "completed"),
            "result": result,
            "error_type": None,
            "error_message": None,
            "finished_at": utcnow(),
        }
        then = await self._aftermath(operation, COMPLETE.target, claim.label)
        return _counted(operation, "completed", await self._finish(claim, COMPLETE, changes, then))

    async def _finish_failed(
        self, operation: Operation, claim: Claim, error_type: str, message: str
    ) -> bool:
        closed = self._closed(claim.attempt_log, "failed", message)
        changes = {**closed, **self._failed(error_type, message)}
        then = await self._aftermath(operation, FAIL.target)
        return _counted(operation, "failed", await self._finish(claim, FAIL, changes, then))

    async def _attempt_failed(self, operation: Operation, claim: Claim, exc: Exception) -> bool:
        error_type, message = describe(exc)
        transient = is_transient(exc)
        if not isinstance(exc, DomainError):
            log.warning("job %s attempt %d failed: %r", claim.operation_id, claim.attempt, exc)
        closed = self._closed(claim.attempt_log, "failed", f"{error_type}: {message}")
        closed["attempt_log"][-1]["transient"] = transient
        if not transient or claim.attempt >= operation.max_attempts:
            if transient:
                message = f"{message} (gave up after {claim.attempt} attempts)"
            then = await self._aftermath(operation, FAIL.target)
            changes = {**closed, **self._failed(error_type, message)}
            return _counted(operation, "failed", await self._finish(claim, FAIL, changes, then))
        # A `RetryLater` job keeps its own schedule (webhook deliveries).
        delay = exc.retry_after if isinstance(exc, RetryLater) else self.backoff(claim.attempt)
        run_after = utcnow() + timedelta(seconds=delay)
        changes = {
            **closed,
            "error_type": error_type,
            "error_message": message,
            "run_after": run_after,
            "enqueued_at": run_after,
            "send_count": operation.send_count + 1,
        }
        if not await self._finish(claim, RETRY, changes):
            return False
        JOB_ATTEMPTS(operation.kind, "retried").inc()
        await self._send(operation, delay)
        return True

    @staticmethod
    def _failed(error_type: str, message: str) -> dict[str, Any]:
        """What a failure records besides its status (which `FAIL` or `move` sets)."""
        return {
            "error_type": error_type,
            "error_message": message,
            "finished_at": utcnow(),
        }

    async def _aftermath(
        self, operation: Operation, outcome: OperationStatus, label: str | None = None
    ) -> Callable[[UnitOfWork, Operation], Awaitable[None]] | None:
        """What must commit with a job's final outcome: its event and its parent's count.

        None when there is neither (no parent, and no one interested in the event), so the
        outcome is one conditional statement.
        """
        types = finished_events(OperationKind(operation.kind), outcome)
        announce = False
        if self.events is not None and operation.parent_id is None:
            for event_type in types:
                if await self.events.interested(event_type):
                    announce = True
                    break
        if not announce and operation.parent_id is None:
            return None

        return lambda uow, written: self._announce(uow, written, outcome, label)

    async def _announce(
        self,
        uow: UnitOfWork,
        written: Operation,
        outcome: OperationStatus,
        label: str | None = None,
    ) -> None:
        """Inside `uow`, with the job's outcome: its event, and its count on its parent."""
        await emit_finished(self.events, uow, written)
        if written.parent_id:
            await count_child_finished(
                uow,
                written.parent_id,
                outcome,
                events=self.events,
                jobs=self._jobs,
                label=label,
            )

    async def _fail(
        self, uow: UnitOfWork, operation: Operation, error_type: str, message: str
    ) -> None:
        move(operation, OperationStatus.FAILED)
        for name, value in self._failed(error_type, message).items():
            setattr(operation, name, value)
        written = await uow.repo(Operation).update(operation)
        await self._announce(uow, written, OperationStatus.FAILED)

    async def _exhaust(self, uow: UnitOfWork, operation: Operation, why: str) -> None:
        await self._fail(
            uow,
            operation,
            "max_attempts_exceeded",
            f"gave up after {operation.attempts} of {operation.max_attempts} attempts: {why}",
        )

    def backoff(self, attempts: int) -> float:
        """Exponential backoff with jitter: about base·2^(n-1), capped, between half and full."""
        ceiling = min(self.timings.retry_max, self.timings.retry_base * 2 ** max(0, attempts - 1))
        return random.uniform(ceiling / 2, ceiling)

    def _send_after_commit(self, uow: UnitOfWork, operation: Operation, delay: float = 0) -> None:
        uow.on_commit(lambda: self._send(operation, delay))

    async def _send(self, operation: Operation, delay: float = 0) -> None:
        """Send a committed job; if the broker is unreachable, leave it for the sweeper."""
        try:
            await self.queue.send(operation.id, OperationKind(operation.kind), delay=delay)
        except Exception:
            log.warning("broker unreachable; job %s left for the sweeper", operation.id)
            await mark_unsent(self.storage, operation.id)

    # ---- sweeping ----------------------------------------------------------------------------

    async def sweep(self) -> SweepReport:
        """Recover jobs whose lease expired and re-send jobs whose message may be lost."""
        report = SweepReport()
        now = utcnow()
        async with self.storage.unit_of_work() as uow:
            expired = await uow.repo(Operation).find(
                Where.eq("status", OperationStatus.RUNNING),
                Where.lt("lease_expires_at", now),
                order_by=["created_at"],
                limit=self.timings.sweep_batch,
            )
        for operation in expired.items:
            try:
                outcome = await self._recover(operation.id)
            except Exception as exc:
                report.errors.append(f"{operation.id}: {exc!r}")
                continue
            if outcome == "recovered":
                report.recovered += 1
            elif outcome == "exhausted":
                report.exhausted += 1
                JOBS_FINISHED(operation.kind, "failed").inc()
            if outcome is not None:
                LEASE_RECOVERIES(outcome).inc()
        report.resent = await self._resend_unsent(report)
        return report

    async def recover_orphans(self) -> int:
        """Return to pending (or fail, out of attempts) the running jobs whose worker's
        heartbeat is gone, without waiting for their leases; how many.

        One grouped count finds the owners of running jobs; only the jobs of those found gone
        are read. A live worker's jobs keep their leases, however slow they are.
        """
        if self.presence is None:
            return 0
        async with self.storage.unit_of_work() as uow:
            owners = await uow.repo(Operation).count_by("lease_owner", _RUNNING)
            known = [owner for owner in owners if owner]
            gone = await self.presence.gone(known)
            if not gone:
                return 0
            orphans = await uow.repo(Operation).find(
                _RUNNING, Where.in_("lease_owner", sorted(gone)), limit=self.timings.sweep_batch
            )
        recovered = 0
        for operation in orphans.items:
            outcome = await self._recover(operation.id, gone=operation.lease_owner)
            if outcome is not None:
                recovered += 1
                LEASE_RECOVERIES(outcome).inc()
                if outcome == "exhausted":
                    JOBS_FINISHED(operation.kind, "failed").inc()
        if recovered:
            log.info("returned %d jobs of workers gone: %s", recovered, ", ".join(sorted(gone)))
        return recovered

    async def _recover(self, operation_id: str, *, gone: str | None = None) -> str | None:
        """Recover a running job whose lease expired, or, with `gone`, whose owner is `gone`
        (a worker whose heartbeat stopped), whatever its lease says."""
        while True:
            try:
                async with self.storage.unit_of_work() as uow:
                    operation = await uow.repo(Operation).get(operation_id)
                    now = utcnow()
                    if operation is None or operation.status != OperationStatus.RUNNING:
                        return None
                    expired = (
                        operation.lease_expires_at is not None and operation.lease_expires_at < now
                    )
                    if not expired and (gone is None or operation.lease_owner != gone):
                        return None
                    worker = operation.lease_owner
                    lost = (
                        f"worker {worker} stopped responding"
                        if expired
                        else f"worker {worker} is gone (its heartbeat stopped)"
                    )
                    for name, value in self._closed(operation.attempt_log, "lost", lost).items():
                        setattr(operation, name, value)
                    if operation.attempts >= operation.max_attempts:
                        await self._exhaust(uow, operation, "its worker kept disappearing")
                        await uow.commit()
                        return "exhausted"
                    move(operation, OperationStatus.PENDING)
                    operation.enqueued_at = now
                    operation.run_after = None
                    operation.send_count += 1
                    await uow.repo(Operation).update(operation)
                    self._send_after_commit(uow, operation)
                    await uow.commit()
                    return "recovered"
            except StaleVersion:
                continue

    async def _resend_unsent(self, report: SweepReport) -> int:
        """Send again the pending jobs whose message may be lost: those whose send failed, and
        those sent `resend_after` ago (then twice that, and so on) that never ran.

        Ago by their queue's clock: while a queue still holds a message sent before a job's, the
        job is waiting its turn in a backlog, not lost, so a queue's clock is when the oldest
        message it holds was sent (now, if it holds none, or the broker cannot tell). A backlog
        is thus not sent again on every tick, which would only lengthen it.
        """
        now = utcnow()
        behind = {kind: sent for kind, sent in (await self._queue_clocks()).items() if sent < now}
        clocks: list[tuple[datetime, list[OperationKind] | None]] = [(now, None)]
        if behind:
            caught_up = [kind for kind in OperationKind if kind not in behind]
            clocks = [(now, caught_up), *((sent, [kind]) for kind, sent in behind.items())]
        due: list[Operation] = []
        async with self.storage.unit_of_work() as uow:
            repo = uow.repo(Operation)
            never = await repo.find(
                Where.eq("status", OperationStatus.PENDING),
                Where.is_null("enqueued_at"),
                Where.gt("send_count", 0),  # a held child waits for its parent to send it
                order_by=["created_at"],
                limit=self.timings.sweep_batch,
            )
            due += never.items
            for clock, kinds in clocks:
                of_kinds = [Where.in_("kind", [k.value for k in kinds])] if kinds else []
                stale = await repo.find(
                    Where.eq("status", OperationStatus.PENDING),
                    Where.lt("enqueued_at", clock - timedelta(seconds=self.timings.resend_after)),
                    *of_kinds,
                    order_by=["created_at"],
                    limit=self.timings.sweep_batch,
                )
                for operation in stale.items:
                    # Back off per job: a message lost again is not re-sent on every tick.
                    assert operation.enqueued_at is not None
                    backoff = 2 ** min(max(operation.send_count - 1, 0), 6)
                    wait = self.timings.resend_after * backoff
                    if operation.enqueued_at + timedelta(seconds=wait) <= clock:
                        due.append(operation)
        resent = 0
        for operation in due:
            if operation.run_after is not None and operation.run_after > now:
                continue
            try:
                # The row is committed already, so sending first cannot race a missing row.
                await self.queue.send(operation.id, OperationKind(operation.kind))
            except Exception as exc:
                report.errors.append(f"broker unreachable: {type(exc).__name__}")
                break  # the broker is down: the rest wait for the next tick
            resent += 1
            try:
                async with self.storage.unit_of_work() as uow:
                    operation.enqueued_at = now
                    operation.send_count += 1
                    await uow.repo(Operation).update(operation)
                    await uow.commit()
            except StaleVersion:
                pass  # it moved on meanwhile (claimed, cancelled): the send was a harmless extra
        return resent

    async def _queue_clocks(self) -> Mapping[OperationKind, datetime]:
        """When the oldest message each queue holds was sent; none known if the broker is
        unreachable (the sends that follow fail and wait for the next tick anyway)."""
        try:
            return await self.queue.waiting_since()
        except Exception:
            log.warning("cannot read the queues' backlog; judging sends by the clock alone")
            return {}

    async def purge_finished(self) -> int:
        """Delete finished top-level jobs (and their children) older than the retention."""
        cutoff = utcnow() - timedelta(seconds=self.timings.retention)
        async with self.storage.unit_of_work() as uow:
            removed = await uow.repo(Operation).delete_where(
                Where.in_("status", list(TERMINAL)),
                Where.lt("finished_at", cutoff),
                Where.is_null("parent_id"),
            )
            await uow.commit()
        return removed


async def _add_rows(uow: UnitOfWork, rows: Sequence[Entity]) -> list[Any]:
    """Inside `uow`: add those of `rows` whose keys are new, one `add_missing` per type; the
    keys of the rows added."""
    by_type: dict[type[Entity], list[Entity]] = {}
    for row in rows:
        by_type.setdefault(type(row), []).append(row)
    new: list[Any] = []
    for entity_type, group in by_type.items():
        new += await uow.repo(entity_type).add_missing(group)
    return new


async def _carried(uow: UnitOfWork, claim: Claim, new: Collection[Any]) -> None:
    """Inside `uow`, once the claim's rows are in (`new`: the keys of those that were new):
    what follows them, then the claim's other writes."""
    for after in claim.after_rows:
        await after(uow, new)
    for write in claim.writes:
        await write(uow)


def _ran(status: str, started: float) -> dict[str, Any]:
    """The `extra` of a job's log line: how its handler ended, and how long it ran since
    `started` (`time.perf_counter()`)."""
    return {"status": status, "duration_ms": round((time.perf_counter() - started) * 1000, 1)}
