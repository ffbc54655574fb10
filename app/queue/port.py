"""The enqueue port: how services hand a committed job to the transport."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Protocol

import dramatiq

from app.core.errors import Unavailable
from app.core.rounds import Rounds
from app.operations.entities import OperationKind
from app.queue.names import ACTORS, QUEUES


class JobQueue(Protocol):
    """Sends a job's id to the workers of its kind; raises `Unavailable` if it cannot."""

    async def send(self, operation_id: str, kind: OperationKind, *, delay: float = 0.0) -> None:
        """Hand the job over (after `delay` seconds); the job row must already be committed."""
        ...


class DramatiqQueue:
    """The port over a Dramatiq broker: a message carries only the job id.

    Broker clients block, so sends run on a thread, a round of them per hand-off
    (`app.core.rounds`): under load one thread hop carries many messages instead of one each,
    and a lone send goes at once.
    """

    def __init__(self, broker: dramatiq.Broker) -> None:
        self.broker = broker
        for queue in QUEUES.values():
            broker.declare_queue(queue)
        self._rounds: Rounds[_Send] = Rounds(self._hand_over)

    def _enqueue(self, operation_id: str, kind: OperationKind, delay_ms: int | None) -> Any:
        message: dramatiq.Message[Any] = dramatiq.Message(
            queue_name=QUEUES[kind],
            actor_name=ACTORS[kind],
            args=(operation_id,),
            kwargs={},
            options={},
        )
        return self.broker.enqueue(message, delay=delay_ms)

    def _enqueue_all(self, sends: list[_Send]) -> list[BaseException | None]:
        outcomes: list[BaseException | None] = []
        for send in sends:
            try:
                self._enqueue(send.operation_id, send.kind, send.delay_ms)
                outcomes.append(None)
            except Exception as exc:
                outcomes.append(exc)
        return outcomes

    async def _hand_over(self, sends: list[_Send]) -> list[BaseException | None]:
        return await asyncio.to_thread(self._enqueue_all, sends)

    async def send(self, operation_id: str, kind: OperationKind, *, delay: float = 0.0) -> None:
        delay_ms = int(delay * 1000) if delay > 0 else None
        try:
            await self._rounds.submit(_Send(operation_id, kind, delay_ms))
        except Exception as exc:
            raise Unavailable(f"the job broker is unreachable: {type(exc).__name__}") from exc


@dataclass(frozen=True, slots=True)
class _Send:
    operation_id: str
    kind: OperationKind
    delay_ms: int | None
