"""The enqueue port over a Dramatiq broker: every send arrives, failures are per message."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from dramatiq import Message
from dramatiq.brokers.stub import StubBroker

from app.core.errors import Unavailable
from app.queue.names import QUEUES, OperationKind
from app.queue.port import DramatiqQueue

CHAT = OperationKind.CHAT_COMPLETION


class CountingQueue(DramatiqQueue):
    """Counts the thread hand-offs; `refuse` names job ids the broker fails to take."""

    def __init__(self, broker: StubBroker) -> None:
        super().__init__(broker)
        self.handoffs: list[int] = []
        self.refuse: set[str] = set()

    def _enqueue_all(self, sends: list[Any]) -> list[BaseException | None]:
        self.handoffs.append(len(sends))
        return super()._enqueue_all(sends)

    def _enqueue(self, operation_id: str, kind: OperationKind, delay_ms: int | None) -> Any:
        if operation_id in self.refuse:
            raise ConnectionError("broker down (fake)")
        return super()._enqueue(operation_id, kind, delay_ms)


def queued_ids(broker: StubBroker, queue: str) -> list[str]:
    return [Message.decode(data).args[0] for data in broker.queues[queue].queue]


@pytest.fixture
def broker() -> StubBroker:
    return StubBroker()


async def test_concurrent_sends_all_arrive_in_fewer_handoffs_than_messages(
    broker: StubBroker,
) -> None:
    port = CountingQueue(broker)
    ids = [f"op_{n:03d}" for n in range(100)]
    await asyncio.gather(*(port.send(i, CHAT) for i in ids))
    assert sorted(queued_ids(broker, QUEUES[CHAT])) == ids
    assert sum(port.handoffs) == 100
    assert len(port.handoffs) < 100, "sends waiting together should share a hand-off"


async def test_a_lone_send_goes_at_once(broker: StubBroker) -> None:
    port = CountingQueue(broker)
    await port.send("op_alone", CHAT)
    assert queued_ids(broker, QUEUES[CHAT]) == ["op_alone"]
    assert port.handoffs == [1]


async def test_a_refused_message_fails_only_its_own_send(broker: StubBroker) -> None:
    port = CountingQueue(broker)
    port.refuse = {"op_002"}
    ids = [f"op_{n:03d}" for n in range(5)]
    outcomes = await asyncio.gather(*(port.send(i, CHAT) for i in ids), return_exceptions=True)
    failed = [i for i, outcome in zip(ids, outcomes, strict=True) if outcome is not None]
    assert failed == ["op_002"]
    assert isinstance(outcomes[2], Unavailable)
    assert sorted(queued_ids(broker, QUEUES[CHAT])) == [i for i in ids if i != "op_002"]
    port.refuse.clear()
    await port.send("op_002", CHAT)  # the broker is back: the next send goes through
    assert "op_002" in queued_ids(broker, QUEUES[CHAT])


async def test_a_delayed_send_goes_to_the_delay_queue(broker: StubBroker) -> None:
    port = CountingQueue(broker)
    await port.send("op_later", CHAT, delay=30)
    assert queued_ids(broker, QUEUES[CHAT]) == []
    assert queued_ids(broker, f"{QUEUES[CHAT]}.DQ") == ["op_later"]


async def test_a_cancelled_sender_does_not_cancel_the_send(broker: StubBroker) -> None:
    port = CountingQueue(broker)
    sender = asyncio.create_task(port.send("op_committed", CHAT))
    await asyncio.sleep(0)  # the hand-off has started
    sender.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sender
    for _ in range(100):
        if queued_ids(broker, QUEUES[CHAT]):
            break
        await asyncio.sleep(0.01)
    assert queued_ids(broker, QUEUES[CHAT]) == ["op_committed"]
