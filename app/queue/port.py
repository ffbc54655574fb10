"""The enqueue port: how services hand a committed job to the transport."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
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
    """The port over a Dramatiq broker: a message carries only the job id.

    Broker clients block, so sends run on a thread; sends made while one hand-off is under
    way wait for the next, which takes them all: under load one thread hop carries many
    messages instead of one each, and a lone send goes at once.
    """

    def __init__(self, broker: dramatiq.Broker) -> None:
        self.broker = broker
        for queue in QUEUES.values():
            broker.declare_queue(queue)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: list[_Send] = []
        self._carrying = False
        self._carrier: asyncio.Task[None] | None = None

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

    async def send(self, operation_id: str, kind: OperationKind, *, delay: float = 0.0) -> None:
        delay_ms = int(delay * 1000) if delay > 0 else None
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new event loop (tests, a restarted runtime)
            self._loop, self._waiting, self._carrying = loop, [], False
        send = _Send(operation_id, kind, delay_ms, loop.create_future())
        self._waiting.append(send)
        if not self._carrying:
            self._carrying = True
            self._carrier = loop.create_task(self._carry())
        failure = await asyncio.shield(send.done)
        if failure is not None:
            raise Unavailable(
                f"the job broker is unreachable: {type(failure).__name__}"
            ) from failure

    async def _carry(self) -> None:
        """Hand every waiting send to the broker, batch after batch, until none waits."""
        try:
            while self._waiting:
                sends, self._waiting = self._waiting, []
                try:
                    outcomes = await asyncio.to_thread(self._enqueue_all, sends)
                except BaseException as exc:  # the thread could not even run them
                    outcomes = [exc] * len(sends)
                for send, outcome in zip(sends, outcomes, strict=True):
                    if not send.done.done():
                        send.done.set_result(outcome)
        finally:
            self._carrying = False


@dataclass(slots=True)
class _Send:
    operation_id: str
    kind: OperationKind
    delay_ms: int | None
    done: asyncio.Future[BaseException | None]
