"""The Redis client of one process: counters, caches, locks and cross-process invalidation."""

from __future__ import annotations

import redis.asyncio as aioredis

from app.config import BrokerKind, Settings


def build_redis(settings: Settings) -> aioredis.Redis:
    """An asyncio client of the Redis the broker uses (the in-process stand-in unless `redis`)."""
    if settings.BROKER is BrokerKind.REDIS:
        return aioredis.Redis.from_url(
            settings.REDIS_URL, socket_connect_timeout=2.0, socket_timeout=5.0
        )
    import fakeredis

    from app.queue.broker import fake_redis_server

    # Same server as the fakeredis broker, so one-process mode sees one Redis, as production does.
    return fakeredis.FakeAsyncRedis(server=fake_redis_server())
