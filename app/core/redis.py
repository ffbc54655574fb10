"""The Redis client of one process: counters, caches, locks and cross-process invalidation."""

from __future__ import annotations

import redis.asyncio as aioredis

from app.config import BrokerKind, Settings


def build_redis(settings: Settings) -> aioredis.Redis:
    """An asyncio client of the Redis the broker uses (the in-process stand-in unless `redis`)."""
    if settings.BROKER is BrokerKind.REDIS:
        # A blocking pool waits (up to `timeout`) for a free connection under a burst of
        # concurrent requests; the default pool raises "Too many connections" past 100.
        pool = aioredis.BlockingConnectionPool(
            max_connections=100,
            timeout=5.0,
            socket_connect_timeout=2.0,
            socket_timeout=5.0,
            **settings.redis_endpoint().pool_kwargs(asyncio=True),
        )
        return aioredis.Redis.from_pool(pool)
    import fakeredis

    from app.queue.broker import fake_redis_server

    # Same server as the fakeredis broker, so one-process mode sees one Redis, as production does.
    # In-process connections cost nothing; the default cap of 100 would fail bursts of requests.
    return fakeredis.FakeAsyncRedis(server=fake_redis_server(), max_connections=10_000)
