"""The enqueue port: how services hand a committed job to the transport."""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import dramatiq

from app.core.errors import Unavailable
from app.operations.entities import OperationKind
from app.queue.names import ACTORS, QUEUES


class JobQueue(Protocol):
    """Sends a job's id to the workers of its kind; raises `Unavailable` if it cannot."""

    async def send(self, operation_id: str, kind: OperationKind, *, delay: float = 0.0) -> None:
        """Hand the job over (after `delay` seconds); the job row must already be committed."""
        ...


class DramatiqQueue:
    """The port over a Dramatiq broker: a message carries only the job id."""

    def __init__(self, broker: dramatiq.Broker) -> None:
        self.broker = broker
        for queue in QUEUES.values():
            broker.declare_queue(queue)

    def _enqueue(self, operation_id: str, kind: OperationKind, delay_ms: int | None) -> Any:
        message: dramatiq.Message[Any] = dramatiq.Message(
            queue_name=QUEUES[kind],
            actor_name=ACTORS[kind],
            args=(operation_id,),
            kwargs={},
            options={},
        )
        return self.broker.enqueue(message, delay=delay_ms)

    async def send(self, operation_id: str, kind: OperationKind, *, delay: float = 0.0) -> None:
        delay_ms = int(delay * 1000) if delay > 0 else None
        try:
            # Broker clients block; a thread keeps a slow or dead broker off the event loop.
            await asyncio.to_thread(self._enqueue, operation_id, kind, delay_ms)
        except Exception as exc:
            raise Unavailable(f"the job broker is unreachable: {type(exc).__name__}") from exc
