"""Queue depth and the age of each queue's oldest waiting job, read from the operations table.

The table, not the broker, is the source of truth: a job is waiting while its row is pending,
whether its message is in Redis, delayed for a retry, or lost and about to be re-sent by the
sweeper. Two grouped queries (`count_by`, over the status index: the sent and the held) give
every queue at once; they run when a scrape finds the gauges older than `max_age`, so scrapers,
however many, cost at most one refresh per `max_age` and process.
"""

from __future__ import annotations

import asyncio
import time

from app.core.clock import utcnow
from app.core.metrics import QUEUE_DEPTH, QUEUE_HELD, QUEUE_OLDEST_AGE
from app.operations.entities import Operation, OperationStatus
from app.queue.names import QUEUES
from app.storage.protocol import Storage, Where


class QueueGauges:
    """Sets `gateway_queue_depth`, `gateway_queue_oldest_job_age_seconds` and
    `gateway_queue_held_jobs` per queue.

    A held job (a child beyond its parent's window: a test run's cases past its concurrency)
    waits for its parent, not for a worker, so it counts as held rather than in the depth."""

    def __init__(self, storage: Storage, *, max_age: float = 10.0) -> None:
        self._storage = storage
        self._max_age = max_age
        self._refreshed: float | None = None
        self._lock = asyncio.Lock()

    async def refresh_if_stale(self) -> None:
        """Refresh unless a refresh of the last `max_age` seconds stands (concurrent scrapes
        share one query)."""
        async with self._lock:
            if self._refreshed is not None and time.monotonic() - self._refreshed < self._max_age:
                return
            await self.refresh()

    async def refresh(self) -> None:
        pending = Where.eq("status", OperationStatus.PENDING)
        async with self._storage.unit_of_work() as uow:
            repo = uow.repo(Operation)
            groups = await repo.count_by(
                "queue", pending, Where.gt("send_count", 0), least="created_at"
            )
            held = await repo.count_by("queue", pending, Where.eq("send_count", 0))
        now = utcnow()
        # Every known queue is set, so a queue that emptied shows 0 rather than its last value.
        for queue in {*QUEUES.values(), *groups, *held}:
            tally = groups.get(queue)
            QUEUE_DEPTH(queue).set(tally.count if tally else 0)
            QUEUE_HELD(queue).set(held[queue].count if queue in held else 0)
            oldest = tally.least if tally else None
            QUEUE_OLDEST_AGE(queue).set(
                max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0
            )
        self._refreshed = time.monotonic()
