"""Queue depth and the age of each queue's oldest waiting job, read from the operations table.

The table, not the broker, is the source of truth: a job is waiting while its row is pending,
whether its message is in Redis, delayed for a retry, or lost and about to be re-sent by the
sweeper. One grouped query (`count_by`, over the status index) gives every queue at once; it
runs when a scrape finds the gauges older than `max_age`, so scrapers, however many, cost at
most one query per `max_age` and process.
"""

from __future__ import annotations

import asyncio
import time

from app.core.clock import utcnow
from app.core.metrics import QUEUE_DEPTH, QUEUE_OLDEST_AGE
from app.operations.entities import Operation, OperationStatus
from app.queue.names import QUEUES
from app.storage.protocol import Storage, Where


class QueueGauges:
    """Sets `gateway_queue_depth` and `gateway_queue_oldest_job_age_seconds` per queue."""

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
        async with self._storage.unit_of_work() as uow:
            groups = await uow.repo(Operation).count_by(
                "queue", Where.eq("status", OperationStatus.PENDING), least="created_at"
            )
        now = utcnow()
        # Every known queue is set, so a queue that emptied shows 0 rather than its last value.
        for queue in {*QUEUES.values(), *groups}:
            tally = groups.get(queue)
            QUEUE_DEPTH(queue).set(tally.count if tally else 0)
            oldest = tally.least if tally else None
            QUEUE_OLDEST_AGE(queue).set(
                max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0
            )
        self._refreshed = time.monotonic()
