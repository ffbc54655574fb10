"""The enqueue port: how services hand a committed job to the transport."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.brokers.stub import StubBroker
from dramatiq.common import current_millis, dq_name

from app.config import BrokerKind, Settings
from app.core.errors import Unavailable
from app.core.redis_pipe import PipelinedRedis
from app.core.rounds import Rounds
from app.queue.names import ACTORS, QUEUES, OperationKind

# How long a send may wait on Redis before it counts as failed (the outbox sends it later).
SEND_TIMEOUT_SECONDS = 10.0

# The message at the head of each Dramatiq queue named in KEYS, or false for an empty one: the
# oldest still waiting, as Dramatiq pushes at a queue's tail and fetches from its head.
_HEADS = """
local heads = {}
for i, queue in ipairs(KEYS) do
    local id = redis.call("lindex", queue, 0)
    heads[i] = id and redis.call("hget", queue .. ".msgs", id) or false
end
return heads
"""


class JobQueue(Protocol):
    """Sends a job's id to the workers of its kind; raises `Unavailable` if it cannot."""

    async def send(self, operation_id: str, kind: OperationKind, *, delay: float = 0.0) -> None:
        """Hand the job over (after `delay` seconds); the job row must already be committed."""
        ...

    async def waiting_since(self) -> Mapping[OperationKind, datetime]:
        """When the oldest message still waiting in each kind's queue was sent, for the queues
        that hold any, as far as the broker can tell: how far behind its queue is, so that a
        job waiting in a backlog is not taken for one whose message was lost."""
        ...


class DramatiqQueue:
    """The port over a Dramatiq broker: a message carries only the job id.

    Broker clients block, so sends run on a thread, a round of them per hand-off
    (`app.core.rounds`): under load one thread hop carries many messages instead of one each,
    and a lone send goes at once. Given `direct` (a client of a Redis broker's server), sends
    skip the thread and the broker's client altogether (`RedisEnqueue`). Either way a send
    that fails is `Unavailable` (the caller leaves the job to the sweeper); one that timed out
    may still have reached Redis, so the sweeper's re-send is then a harmless extra message.
    A direct send cancelled before it was written is not marked unsent: the sweeper re-sends
    it once the send is `resend_after` old, as it does any pending job's.
    """

    def __init__(self, broker: dramatiq.Broker, *, direct: PipelinedRedis | None = None) -> None:
        self.broker = broker
        for queue in QUEUES.values():
            broker.declare_queue(queue)
        self._rounds: Rounds[_Send] = Rounds(self._hand_over)
        self._direct = RedisEnqueue(broker, direct) if direct is not None else None
        if direct is None and isinstance(broker, RedisBroker):
            self._heads = broker.client.register_script(_HEADS)

    def _message(self, operation_id: str, kind: OperationKind) -> dramatiq.Message[Any]:
        return dramatiq.Message(
            queue_name=QUEUES[kind],
            actor_name=ACTORS[kind],
            args=(operation_id,),
            kwargs={},
            options={},
        )

    def _enqueue(self, operation_id: str, kind: OperationKind, delay_ms: int | None) -> Any:
        return self.broker.enqueue(self._message(operation_id, kind), delay=delay_ms)

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
            if self._direct is not None:
                async with asyncio.timeout(SEND_TIMEOUT_SECONDS):
                    await self._direct.enqueue(
                        QUEUES[kind], ACTORS[kind], (operation_id,), delay_ms
                    )
            else:
                await self._rounds.submit(_Send(operation_id, kind, delay_ms))
        except Exception as exc:
            raise Unavailable(f"the job broker is unreachable: {type(exc).__name__}") from exc

    async def waiting_since(self) -> Mapping[OperationKind, datetime]:
        kinds = list(QUEUES)
        heads: list[bytes | None]
        if isinstance(self.broker, RedisBroker):
            keys = [f"{self.broker.namespace}:{QUEUES[kind]}" for kind in kinds]
            if self._direct is not None:
                heads = await self._direct.heads(keys)
            else:  # fakeredis: through the broker's own client, on a thread
                heads = await asyncio.to_thread(self._heads, keys)
        elif isinstance(self.broker, StubBroker):
            waiting = [self.broker.queues.get(QUEUES[kind]) for kind in kinds]
            heads = [q.queue[0] if q is not None and q.queue else None for q in waiting]
        else:
            return {}
        return {kind: _sent_at(head) for kind, head in zip(kinds, heads, strict=True) if head}

    async def aclose(self) -> None:
        if self._direct is not None:
            await self._direct.client.aclose()


def _sent_at(encoded: bytes) -> datetime:
    """When the Dramatiq message `encoded` was sent."""
    millis = dramatiq.Message.decode(encoded).message_timestamp
    return datetime.fromtimestamp(millis / 1000, UTC)


class RedisEnqueue:
    """Enqueues on a Dramatiq `RedisBroker` from the event loop, over the pipelined client.

    It writes what `RedisBroker.enqueue` writes — the same message, through Dramatiq's own
    `dispatch` script with the broker's namespace and id — without the blocking client, so a
    send needs neither a thread nor redis-py (a third of the API's CPU per async job).
    Dramatiq's enqueue middleware hooks run as they would. The script's queue maintenance,
    which a small share of dispatches do, is left to the workers' fetches.
    """

    def __init__(self, broker: dramatiq.Broker, client: PipelinedRedis) -> None:
        if not isinstance(broker, RedisBroker):
            raise TypeError(f"direct sends need a RedisBroker, not {type(broker).__name__}")
        self.broker = broker
        self.client = client
        source = broker.scripts["dispatch"].script
        self._dispatch = client.register_script(
            source.decode() if isinstance(source, bytes) else str(source)
        )
        self._heads = client.register_script(_HEADS)

    async def heads(self, keys: list[str]) -> list[bytes | None]:
        """The message at the head of each queue (the oldest waiting), None for an empty one;
        `keys` are the queues' keys (the broker's namespace, a colon, the queue's name)."""
        heads: list[bytes | None] = await self._heads(keys=keys)
        return heads

    async def enqueue(
        self, queue_name: str, actor_name: str, args: tuple[Any, ...], delay_ms: int | None
    ) -> None:
        broker = self.broker
        options: dict[str, Any] = {"redis_message_id": str(uuid.uuid4())}
        if delay_ms is not None:
            queue_name = dq_name(queue_name)
            options["eta"] = current_millis() + delay_ms
        message: dramatiq.Message[Any] = dramatiq.Message(
            queue_name=queue_name, actor_name=actor_name, args=args, kwargs={}, options=options
        )
        broker.emit_before("enqueue", message, delay_ms)
        await self._dispatch(
            keys=(broker.namespace,),
            args=(
                "enqueue",
                current_millis(),
                queue_name,
                broker.broker_id,
                broker.heartbeat_timeout,
                broker.dead_message_ttl,
                0,  # no maintenance
                1,  # the most ids a fetch (or maintenance) unpacks at once: unused here
                options["redis_message_id"],
                message.encode(),
            ),
        )
        broker.emit_after("enqueue", message, delay_ms)


def build_queue(settings: Settings, broker: dramatiq.Broker) -> DramatiqQueue:
    """The queue over `broker`; on a real Redis its sends go out from the event loop.

    The direct client connects where `build_broker` connects the broker's own client: both take
    `settings.redis_endpoint()`.
    """
    if settings.BROKER is BrokerKind.REDIS and isinstance(broker, RedisBroker):
        return DramatiqQueue(broker, direct=PipelinedRedis(settings.redis_endpoint()))
    return DramatiqQueue(broker)


@dataclass(frozen=True, slots=True)
class _Send:
    operation_id: str
    kind: OperationKind
    delay_ms: int | None
