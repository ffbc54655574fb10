"""Where a settled call's usage goes: committed before its answer leaves, or with its job.

A direct call's usage record and execution log are committed to the database before its answer
is sent (`UsageWriter`): the calls that settle while one transaction commits share the next,
so a busy process pays one commit for many calls and a lone call one commit of its own. A call
made inside a job hands them to the job instead (`JobUsage`), which commits them in the
transaction of the job's outcome. Either way rows are inserted only if their id is new
(`UsageService.write_usage`), and the budgets the call was admitted against are charged in the
same transaction for the new rows alone: the spend recorded is the usage recorded, whatever
crashed, and however often a write is retried.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from app.core.errors import DuplicateKey, StaleVersion, Unavailable
from app.storage.entity import Entity
from app.storage.protocol import Storage, UnitOfWork

log = logging.getLogger(__name__)

_WRITE_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class CallUsage:
    """What one settled call leaves: its usage record and execution log, as JSON rows (what
    `model_dump(mode="json")` of the entities gives), and the budgets its cost is charged to
    (those it was admitted against, as the Redis counters count it)."""

    record: dict[str, Any]
    log: dict[str, Any]
    budget_ids: tuple[str, ...] = ()


class UsageRows(Protocol):
    """Writes calls' usage inside a unit of work (`UsageService`)."""

    async def write_usage(self, uow: UnitOfWork, calls: Sequence[CallUsage]) -> int:
        """Add the calls' rows whose ids are new and charge their budgets for the new ones."""
        ...

    def usage_rows(self, calls: Sequence[CallUsage]) -> list[Entity]:
        """The calls' usage records and execution logs, as entities to add."""
        ...

    async def charge_new(
        self, uow: UnitOfWork, calls: Sequence[CallUsage], new: Collection[Any]
    ) -> None:
        """Charge the budgets of the calls whose usage records were new (their ids in `new`)."""
        ...


class UsageLedger(Protocol):
    """Where settlement puts a call's usage."""

    async def record(self, usage: CallUsage) -> None:
        """Make `usage` durable, or hand it to what commits it (a job's outcome); raises
        `Unavailable` when it cannot be."""
        ...


class OutcomeWrites(Protocol):
    """A running job, which commits rows with its outcome (`JobContext`)."""

    def add_with_outcome(
        self,
        rows: Sequence[Entity],
        then: Callable[[UnitOfWork, Collection[Any]], Awaitable[Any]] | None = None,
    ) -> None: ...


class JobUsage:
    """The usage of the calls one job attempt makes, committed with the attempt's outcome.

    A worker that dies mid-job commits neither the outcome nor the usage; the attempt that
    finishes the job writes both, so every finished job is paid for exactly once. A call
    charged to no budget adds only its rows, which go in the outcome's own statement.
    """

    def __init__(self, rows: UsageRows, job: OutcomeWrites) -> None:
        self._rows = rows
        self._job = job

    async def record(self, usage: CallUsage) -> None:
        then = None
        if usage.budget_ids and int(usage.record.get("cost_micros") or 0) > 0:

            async def then(uow: UnitOfWork, new: Collection[Any]) -> None:
                await self._rows.charge_new(uow, [usage], new)

        self._job.add_with_outcome(self._rows.usage_rows([usage]), then)


class UsageWriter:
    """Commits direct calls' usage before their answers leave, many calls per transaction.

    Up to `in_flight` transactions run at once, each on its own connection; the calls that
    settle while all of them are busy wait and go together in the next one free, so under load
    the wait is about one commit and the database's group commit serves several transactions
    with one flush. A transaction that fails
    fails its calls (`Unavailable`: their answers are not sent), and their rows are kept and
    written again every `retry_interval` seconds (those upstream calls were paid for), up to
    `max_kept` rows; closing writes what is left.
    """

    def __init__(
        self,
        storage: Storage,
        rows: UsageRows,
        *,
        max_batch: int = 500,
        in_flight: int = 2,
        retry_interval: float = 1.0,
        max_kept: int = 100_000,
    ) -> None:
        self._storage = storage
        self._rows = rows
        self._max_batch = max_batch
        self._retry_interval = retry_interval
        self._max_kept = max_kept
        self._in_flight = max(1, in_flight)
        self._waiting: deque[tuple[CallUsage, asyncio.Future[None]]] = deque()
        self._writing: set[asyncio.Task[None]] = set()
        self._unstarted: set[asyncio.Task[None]] = set()  # not yet taken their first calls
        self._kept: deque[CallUsage] = deque()
        self._retrying: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def kept(self) -> int:
        """How many calls' usage failed to be written and waits for the next attempt."""
        return len(self._kept)

    async def record(self, usage: CallUsage) -> None:
        """Return once `usage` is committed; `Unavailable` when its transaction failed."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieved)  # its caller may be gone by the time it fails
        self._waiting.append((usage, future))
        # Another transaction starts only when every running one has taken its calls: one that
        # has not will take this call with the others waiting.
        if not self._unstarted and len(self._writing) < self._in_flight:
            task = asyncio.get_running_loop().create_task(self._write_waiting())
            self._writing.add(task)
            self._unstarted.add(task)
            task.add_done_callback(self._writing.discard)
            task.add_done_callback(self._unstarted.discard)
        # Shielded: a caller that goes away (a client hanging up) still has its usage written.
        await asyncio.shield(future)

    async def _write_waiting(self) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._unstarted.discard(task)
        while self._waiting:
            batch = [
                self._waiting.popleft() for _ in range(min(self._max_batch, len(self._waiting)))
            ]
            try:
                await self.write([usage for usage, _ in batch])
            except BaseException as exc:
                log.exception("usage of %d calls could not be written; kept for later", len(batch))
                self._keep([usage for usage, _ in batch])
                failure = Unavailable(
                    f"the call's usage could not be recorded ({type(exc).__name__}); "
                    "its answer is withheld, try again"
                )
                for _, future in batch:
                    if not future.done():
                        future.set_exception(failure)
                if not isinstance(exc, Exception):
                    raise
            else:
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)

    async def write(self, calls: Sequence[CallUsage]) -> None:
        """Commit `calls` in one transaction (again, whole, when it collided with another
        writer of the same rows or budgets: writing them is idempotent)."""
        for attempt in range(1, _WRITE_ATTEMPTS + 1):
            try:
                async with self._storage.unit_of_work() as uow:
                    await self._rows.write_usage(uow, calls)
                    await uow.commit()
                return
            except (StaleVersion, DuplicateKey):
                if attempt == _WRITE_ATTEMPTS:
                    raise

    def _keep(self, calls: list[CallUsage]) -> None:
        self._kept.extend(calls)
        dropped = 0
        while len(self._kept) > self._max_kept:
            self._kept.popleft()
            dropped += 1
        if dropped:
            log.error("usage kept for a later write overflowed: %d calls' usage dropped", dropped)
        if not self._closed and (self._retrying is None or self._retrying.done()):
            self._retrying = asyncio.get_running_loop().create_task(self._retry())

    async def _retry(self) -> None:
        while self._kept and not self._closed:
            await asyncio.sleep(self._retry_interval)
            await self._write_kept()

    async def _write_kept(self) -> None:
        while self._kept:
            batch = [self._kept.popleft() for _ in range(min(self._max_batch, len(self._kept)))]
            try:
                await self.write(batch)
            except BaseException as exc:
                self._kept.extendleft(reversed(batch))
                if not isinstance(exc, Exception):
                    raise
                log.warning("usage of %d calls still cannot be written", len(self._kept))
                return

    async def close(self) -> None:
        """Wait for the transaction in flight, then write what earlier ones failed to."""
        self._closed = True
        while self._writing:
            await asyncio.gather(*self._writing, return_exceptions=True)
        if self._retrying is not None:
            self._retrying.cancel()
        await self._write_kept()
        if self._kept:
            log.error("usage of %d unanswered calls lost at shutdown", len(self._kept))


def _retrieved(future: asyncio.Future[None]) -> None:
    """Mark a failure seen, so that one whose caller went away is not reported as unretrieved
    (the writer has logged it and kept the rows)."""
    if not future.cancelled():
        future.exception()
