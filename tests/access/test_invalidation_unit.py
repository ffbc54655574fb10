"""The in-process cache: expiry, invalidation, and no stale fill after an invalidation."""

from __future__ import annotations

import redis.asyncio as aioredis

from app.core.invalidation import UNSUBSCRIBED_TTL, InvalidatedCache, InvalidationBus


async def test_a_read_that_raced_an_invalidation_is_not_cached() -> None:
    bus = InvalidationBus(None, shared=False)
    cache: InvalidatedCache[str] = InvalidatedCache(bus, "things", ttl=60)
    generation = cache.generation
    await bus.publish("things", "a")  # announced while the read was in flight
    cache.fill("a", "old value", generation)
    assert cache.get("a") is None
    cache.fill("a", "new value", cache.generation)
    assert cache.get("a") == "new value"
    await bus.publish("things", "a")
    assert cache.get("a") is None


async def test_without_a_confirmed_subscription_entries_live_one_second() -> None:
    shared = InvalidationBus(None, shared=True)  # not listening: messages could be missed
    assert shared.ttl(30.0) == UNSUBSCRIBED_TTL
    alone = InvalidationBus(None, shared=False)  # one process: every change is seen here
    assert alone.ttl(30.0) == 30.0


def test_installs_on_different_redis_databases_do_not_share_a_channel() -> None:
    first = InvalidationBus(aioredis.Redis.from_url("redis://127.0.0.1:6379/3"))
    second = InvalidationBus(aioredis.Redis.from_url("redis://127.0.0.1:6379/4"))
    assert first.channel != second.channel
