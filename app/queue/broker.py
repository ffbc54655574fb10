"""Building the Dramatiq broker that `BROKER` names (before any actor module is imported)."""

from __future__ import annotations

from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import AsyncIO

from app.config import BrokerKind, Settings
from app.core.redis import fake_redis_client
from app.queue.encoding import FastJSONEncoder
from app.queue.names import ALL_QUEUES


def build_broker(settings: Settings, *, middleware: list[Any] | None = None) -> dramatiq.Broker:
    """The broker for `settings.BROKER`, with the AsyncIO middleware and every queue declared."""
    dramatiq.set_encoder(FastJSONEncoder())
    broker: dramatiq.Broker
    if settings.BROKER is BrokerKind.STUB:
        broker = StubBroker()
    elif settings.BROKER is BrokerKind.FAKEREDIS:
        broker = RedisBroker(client=fake_redis_client(), namespace="gateway")  # type: ignore[no-untyped-call]
    else:
        pool = redis.ConnectionPool(
            socket_connect_timeout=2.0,
            socket_timeout=10.0,
            **settings.redis_endpoint().pool_kwargs(asyncio=False),
        )
        client = redis.Redis.from_pool(pool)
        broker = RedisBroker(client=client, namespace="gateway")  # type: ignore[no-untyped-call]
    broker.add_middleware(AsyncIO())
    for extra in middleware or []:
        broker.add_middleware(extra)
    for queue in ALL_QUEUES:
        broker.declare_queue(queue)
    return broker
