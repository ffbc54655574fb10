"""Sends that skip the broker's client: on real Redis, Dramatiq reads them as its own."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
import redis
from dramatiq import Message, Middleware
from dramatiq.brokers.redis import RedisBroker

from app.config import Settings
from app.core.clock import utcnow
from app.core.errors import Unavailable
from app.core.redis_pipe import PipelinedRedis
from app.queue.broker import build_broker
from app.queue.names import ACTORS, QUEUES, OperationKind
from app.queue.port import DramatiqQueue, build_queue

CHAT = OperationKind.CHAT_COMPLETION
WEBHOOK = OperationKind.WEBHOOK_DELIVERY


class SeenEnqueues(Middleware):
    def __init__(self) -> None:
        self.before: list[str] = []
        self.after: list[str] = []

    def before_enqueue(self, broker: Any, message: Message[Any], delay: int) -> None:
        self.before.append(message.args[0])

    def after_enqueue(self, broker: Any, message: Message[Any], delay: int) -> None:
        self.after.append(message.args[0])


@pytest.fixture
def settings(redis_url: str) -> Settings:
    with redis.Redis.from_url(redis_url) as client:
        client.flushdb()
    return redis_settings(redis_url)


@pytest.fixture
async def queue(settings: Settings) -> AsyncIterator[DramatiqQueue]:
    port = build_queue(settings, build_broker(settings))
    yield port
    await port.aclose()


def redis_settings(redis_url: str) -> Settings:
    return Settings(
        BROKER="redis",  # type: ignore[arg-type]
        REDIS_URL=redis_url,
        STORAGE_BACKEND="postgres",  # type: ignore[arg-type]
        SECRET_KEY="a-secret-key-for-these-tests-only-0123456789",  # type: ignore[arg-type]
    )


def received(broker: RedisBroker, queue_name: str) -> list[Message[Any]]:
    """What a Dramatiq consumer of `queue_name` fetches (and acks) until the queue is empty."""
    consumer = broker.consume(queue_name, prefetch=64, timeout=100)
    messages: list[Message[Any]] = []
    try:
        misses = 0
        while misses < 5:  # a consumer returns None after each empty poll
            proxy = next(consumer)
            if proxy is None:
                misses += 1
                continue
            messages.append(proxy._message)
            consumer.ack(proxy)
    finally:
        consumer.close()
    return messages


def test_a_redis_broker_gets_the_direct_path_and_other_brokers_do_not(redis_url: str) -> None:
    real = redis_settings(redis_url)
    stub = Settings(BROKER="stub")  # type: ignore[arg-type]
    fake = Settings(BROKER="fakeredis")  # type: ignore[arg-type]
    assert build_queue(real, build_broker(real))._direct is not None
    assert build_queue(stub, build_broker(stub))._direct is None
    assert build_queue(fake, build_broker(fake))._direct is None  # its Redis is in-process


async def test_a_direct_send_is_a_message_dramatiq_consumes(queue: DramatiqQueue) -> None:
    broker = queue.broker
    assert isinstance(broker, RedisBroker)
    await queue.send("op_direct", CHAT)
    messages = await asyncio.to_thread(received, broker, QUEUES[CHAT])
    assert [(m.queue_name, m.actor_name, m.args) for m in messages] == [
        (QUEUES[CHAT], ACTORS[CHAT], ("op_direct",))
    ]
    assert messages[0].options["redis_message_id"] != messages[0].message_id


async def test_concurrent_direct_sends_all_arrive_once(queue: DramatiqQueue) -> None:
    broker = queue.broker
    assert isinstance(broker, RedisBroker)
    ids = [f"op_{n:03d}" for n in range(200)]
    await asyncio.gather(*(queue.send(i, CHAT) for i in ids))
    messages = await asyncio.to_thread(received, broker, QUEUES[CHAT])
    assert sorted(m.args[0] for m in messages) == ids


async def test_a_direct_send_goes_to_its_kinds_queue(queue: DramatiqQueue) -> None:
    broker = queue.broker
    assert isinstance(broker, RedisBroker)
    await queue.send("op_hook", WEBHOOK)
    assert await asyncio.to_thread(received, broker, QUEUES[CHAT]) == []
    messages = await asyncio.to_thread(received, broker, QUEUES[WEBHOOK])
    assert [(m.actor_name, m.args) for m in messages] == [(ACTORS[WEBHOOK], ("op_hook",))]


async def test_a_delayed_direct_send_waits_in_the_delay_queue_with_its_eta(
    queue: DramatiqQueue, redis_url: str
) -> None:
    broker = queue.broker
    assert isinstance(broker, RedisBroker)
    await queue.send("op_later", CHAT, delay=30)
    assert await asyncio.to_thread(received, broker, QUEUES[CHAT]) == []
    messages = await asyncio.to_thread(received, broker, f"{QUEUES[CHAT]}.DQ")
    assert [m.args for m in messages] == [("op_later",)]
    eta = messages[0].options["eta"]
    assert 25_000 <= eta - messages[0].message_timestamp <= 35_000


async def test_direct_sends_run_the_brokers_enqueue_hooks(settings: Settings) -> None:
    seen = SeenEnqueues()
    port = build_queue(settings, build_broker(settings, middleware=[seen]))
    try:
        await port.send("op_hooked", CHAT)
    finally:
        await port.aclose()
    assert seen.before == seen.after == ["op_hooked"]


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_an_unreachable_redis_fails_the_send_as_unavailable_and_a_later_one_goes_through(
    settings: Settings, redis_url: str
) -> None:
    broker = build_broker(settings)
    port = DramatiqQueue(broker, direct=PipelinedRedis(f"redis://127.0.0.1:{_unused_port()}/0"))
    with pytest.raises(Unavailable, match="broker is unreachable"):
        await port.send("op_lost", CHAT)
    await port.aclose()

    port = DramatiqQueue(broker, direct=PipelinedRedis(redis_url))
    try:
        await port.send("op_next", CHAT)
    finally:
        await port.aclose()
    assert isinstance(broker, RedisBroker)
    messages = await asyncio.to_thread(received, broker, QUEUES[CHAT])
    assert [m.args for m in messages] == [("op_next",)]


# ---- how far behind the queues are -------------------------------------------------------------


async def test_a_queue_says_when_its_oldest_waiting_message_was_sent(
    queue: DramatiqQueue,
) -> None:
    broker = queue.broker
    assert isinstance(broker, RedisBroker)
    assert await queue.waiting_since() == {}  # nothing waits anywhere
    before = utcnow() - timedelta(milliseconds=1)  # message stamps are whole milliseconds
    await queue.send("op_first", CHAT)
    await asyncio.sleep(0.05)
    await queue.send("op_second", CHAT)
    after_first = utcnow()
    waiting = await queue.waiting_since()
    assert set(waiting) == {CHAT}  # the webhooks queue holds nothing
    assert before <= waiting[CHAT] < after_first - timedelta(milliseconds=40)  # the first's
    consumer = broker.consume(QUEUES[CHAT], prefetch=1, timeout=100)
    try:
        proxy = await asyncio.to_thread(next, consumer)  # takes the first off the queue
        assert proxy is not None and proxy.args == ("op_first",)
        assert before + timedelta(milliseconds=40) < (await queue.waiting_since())[CHAT]
        consumer.ack(proxy)
    finally:
        consumer.close()


@pytest.mark.parametrize("kind", ["stub", "fakeredis"])
async def test_the_in_process_brokers_say_how_far_behind_their_queues_are(kind: str) -> None:
    settings = Settings(BROKER=kind)  # type: ignore[arg-type]
    port = build_queue(settings, build_broker(settings))
    assert await port.waiting_since() == {}
    before = utcnow() - timedelta(milliseconds=1)
    await port.send("op_waiting", WEBHOOK)
    waiting = await port.waiting_since()
    assert set(waiting) == {WEBHOOK} and before <= waiting[WEBHOOK] <= utcnow()
