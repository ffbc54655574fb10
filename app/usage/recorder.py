"""Usage records and execution logs leave the request path through an in-process buffer.

Each process buffers what its calls produced and hands it over in batches (every second or
every `max_records`) to a `BatchSender`: a queue message whose worker inserts the batch, so
a request never waits on an insert. Closing the buffer (API lifespan, worker shutdown)
flushes what is left, so a graceful shutdown loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol

from app.logs.entities import ExecutionLog
from app.storage.mapping import validate
from app.usage.entities import UsageRecord

log = logging.getLogger(__name__)

Batch = dict[str, list[dict[str, Any]]]
# An entity, or its JSON row as `model_dump(mode="json")` gives it (the hot path builds rows).
Entry = UsageRecord | ExecutionLog | dict[str, Any]


class BatchSender(Protocol):
    """Hands a batch to whatever writes it; raises when it cannot (the batch is kept)."""

    async def send(self, batch: Batch) -> None: ...


def as_row(entry: Entry) -> dict[str, Any]:
    """The JSON row of an entity (a row is returned as it is)."""
    return entry if isinstance(entry, dict) else entry.model_dump(mode="json")


def encode_batch(
    records: Sequence[UsageRecord | dict[str, Any]], logs: Sequence[ExecutionLog | dict[str, Any]]
) -> Batch:
    """A JSON-safe batch (the shape of a queue message)."""
    return {"usage": [as_row(r) for r in records], "logs": [as_row(entry) for entry in logs]}


def decode_batch(batch: Batch) -> tuple[list[UsageRecord], list[ExecutionLog]]:
    records = [validate(UsageRecord, r) for r in batch.get("usage", [])]
    logs = [validate(ExecutionLog, entry) for entry in batch.get("logs", [])]
    return records, logs


class AccountingBuffer:
    """Collects usage records and execution logs and sends them in batches."""

    def __init__(
        self,
        sender: BatchSender,
        *,
        interval: float = 1.0,
        max_records: int = 200,
        max_buffered: int = 100_000,
    ) -> None:
        self._sender = sender
        self._interval = interval
        self._max_records = max_records
        self._max_buffered = max_buffered
        self._usage: deque[dict[str, Any]] = deque()
        self._logs: deque[dict[str, Any]] = deque()
        self._full = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        self._late: set[asyncio.Task[None]] = set()

    @property
    def pending(self) -> int:
        return len(self._usage) + len(self._logs)

    def add(
        self,
        record: UsageRecord | dict[str, Any] | None,
        entry: ExecutionLog | dict[str, Any] | None,
    ) -> None:
        """Queue a record and a log (entities or their JSON rows) for the next batch (never
        blocks, never fails)."""
        if record is not None:
            self._usage.append(as_row(record))
        if entry is not None:
            self._logs.append(as_row(entry))
        self._drop_overflow()
        if self.pending >= self._max_records:
            self._full.set()
        self._ensure_running()

    def _drop_overflow(self) -> None:
        # Only reached when the sender has been failing for a long time; memory must stay bounded.
        dropped = 0
        while self.pending > self._max_buffered:
            (self._logs or self._usage).popleft()
            dropped += 1
        if dropped:
            log.error("accounting buffer full: dropped %d oldest entries", dropped)

    def _ensure_running(self) -> None:
        loop = asyncio.get_running_loop()
        if self._closed:
            # A call that finishes during shutdown: send its entries at once, alone.
            self._late.add(loop.create_task(self._flush_late()))
            return
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run())

    async def _flush_late(self) -> None:
        try:
            await self.flush()
        except Exception:
            log.exception("accounting entries lost after shutdown: %d", self.pending)
        finally:
            task = asyncio.current_task()
            if task is not None:
                self._late.discard(task)

    async def _run(self) -> None:
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._full.wait(), timeout=self._interval)
            self._full.clear()
            try:
                await self.flush()
            except Exception:
                log.exception("sending an accounting batch failed; retrying next tick")

    async def flush(self) -> None:
        """Send everything buffered, in batches; what could not be sent stays buffered."""
        async with self._lock:
            while self._usage or self._logs:
                records = [
                    self._usage.popleft() for _ in range(min(self._max_records, len(self._usage)))
                ]
                room = self._max_records - len(records)
                logs = [self._logs.popleft() for _ in range(min(room, len(self._logs)))]
                try:
                    await self._sender.send(encode_batch(records, logs))
                except BaseException:
                    self._usage.extendleft(reversed(records))
                    self._logs.extendleft(reversed(logs))
                    raise

    async def close(self) -> None:
        """Stop the background flusher and send what is left."""
        self._closed = True
        if self._task is not None:
            # Woken rather than cancelled, so a batch being sent is never cut in half.
            self._full.set()
            await self._task
            self._task = None
        try:
            await self.flush()
        except Exception:
            log.exception("accounting entries lost at shutdown: %d", self.pending)
