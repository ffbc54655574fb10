"""Sends accounting batches (usage records and execution logs) to the `usage` queue."""

from __future__ import annotations

import asyncio
from typing import Any

import dramatiq

from app.core.errors import Unavailable
from app.queue.names import USAGE_ACTOR, USAGE_QUEUE


class DramatiqBatchSender:
    """One message per batch; the worker's actor inserts it (idempotently)."""

    def __init__(self, broker: dramatiq.Broker) -> None:
        self._broker = broker
        broker.declare_queue(USAGE_QUEUE)

    def _enqueue(self, batch: dict[str, Any]) -> None:
        message: dramatiq.Message[Any] = dramatiq.Message(
            queue_name=USAGE_QUEUE, actor_name=USAGE_ACTOR, args=(batch,), kwargs={}, options={}
        )
        self._broker.enqueue(message)

    async def send(self, batch: dict[str, Any]) -> None:
        try:
            # Broker clients block; a thread keeps a slow broker off the event loop.
            await asyncio.to_thread(self._enqueue, batch)
        except Exception as exc:
            raise Unavailable(f"the accounting queue is unreachable: {type(exc).__name__}") from exc
