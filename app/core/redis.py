"""The Redis client of one process: counters, caches, locks and cross-process invalidation.

Also the in-process stand-in for Redis that `BROKER=fakeredis` and `BROKER=stub` use: one
server per name, shared by the broker (`app.queue.broker`) and this client, so a process without
a Redis server still sees one Redis, as production does.
"""

from __future__ import annotations

from typing import Any, Protocol

import redis
import redis.asyncio as aioredis

from app.core.redis_url import RedisEndpoint

# The `BROKER` (`app.config.BrokerKind`) that names a Redis server; the others run in-process.
REDIS_SERVER = "redis"

_fake_servers: dict[str, Any] = {}


class RedisSettings(Protocol):
    """What `build_redis` reads of `app.config.Settings`.

    A protocol rather than the class: `app.config` checks its values with `app.core`'s parsers,
    so `app.core` sits below it and never imports it.
    """

    @property
    def BROKER(self) -> str: ...

    def redis_endpoint(self) -> RedisEndpoint: ...


def fake_redis_server(name: str = "default") -> Any:
    """This process's in-memory Redis stand-in (one server per name)."""
    import fakeredis

    return _fake_servers.setdefault(name, fakeredis.FakeServer())


def fake_redis_client(name: str = "default") -> redis.Redis:
    """A blocking client of this process's in-memory Redis stand-in (the broker's)."""
    import fakeredis

    return fakeredis.FakeRedis(server=fake_redis_server(name))


def build_redis(settings: RedisSettings) -> aioredis.Redis:
    """An asyncio client of the Redis the broker uses (the in-process stand-in unless `redis`)."""
    if settings.BROKER == REDIS_SERVER:
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

    # In-process connections cost nothing; the default cap of 100 would fail bursts of requests.
    return fakeredis.FakeAsyncRedis(server=fake_redis_server(), max_connections=10_000)
