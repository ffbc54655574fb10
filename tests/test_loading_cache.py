"""The shared loading cache behind the API key, route, limit and budget caches."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from app.core.loading import LoadingCache


class Source:
    """A load that counts its reads, takes a turn of the loop, and fails while told to."""

    def __init__(self) -> None:
        self.reads: list[str] = []
        self.failing = False
        self.release = asyncio.Event()
        self.release.set()

    async def __call__(self, key: str) -> str:
        self.reads.append(key)
        read = len(self.reads)
        await self.release.wait()
        await asyncio.sleep(0)
        if self.failing:
            raise ConnectionError("database down")
        return f"{key}#{read}"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def source() -> Source:
    return Source()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def cache_of(
    source: Source,
    clock: Clock,
    *,
    ttl: float | Callable[[str], float] = 10.0,
    grace: float = 0.0,
    max_entries: int | None = None,
) -> LoadingCache[str, str]:
    return LoadingCache(source, ttl=ttl, grace=grace, clock=clock, max_entries=max_entries)


async def test_concurrent_callers_share_one_load_and_the_value_is_kept(
    source: Source, clock: Clock
) -> None:
    cache = cache_of(source, clock)
    values = await asyncio.gather(*(cache.get_or_load("k") for _ in range(30)))
    assert values == ["k#1"] * 30 and source.reads == ["k"]
    assert cache.get("k") == "k#1"
    assert await cache.get_or_load("k") == "k#1" and len(source.reads) == 1


async def test_a_fresh_value_is_answered_without_starting_a_load(
    source: Source, clock: Clock
) -> None:
    cache = cache_of(source, clock, grace=10.0)
    await cache.load("k")
    clock.now += 9.9
    assert cache.get("k") == "k#1"
    assert cache._loading == {} and len(source.reads) == 1


async def test_a_failed_load_reaches_every_waiter_and_is_not_kept(
    source: Source, clock: Clock
) -> None:
    cache = cache_of(source, clock)
    source.failing = True
    results = await asyncio.gather(
        *(cache.get_or_load("k") for _ in range(5)), return_exceptions=True
    )
    assert len(results) == 5 and all(isinstance(r, ConnectionError) for r in results)
    assert source.reads == ["k"] and cache.get("k") is None
    source.failing = False
    assert await cache.get_or_load("k") == "k#2"


@pytest.mark.parametrize("invalidate", ["forget", "clear"])
async def test_a_load_that_spans_an_invalidation_is_not_kept_nor_joined(
    source: Source, clock: Clock, invalidate: str
) -> None:
    cache = cache_of(source, clock)
    source.release.clear()
    before = asyncio.ensure_future(cache.load("k"))
    await asyncio.sleep(0)
    cache.forget("k") if invalidate == "forget" else cache.clear()
    after = asyncio.ensure_future(cache.load("k"))  # a new read: the first may hold old data
    await asyncio.sleep(0)
    source.release.set()
    assert await before == "k#1"  # its caller still gets what was read for it
    assert await after == "k#2" and source.reads == ["k", "k"]
    assert cache.get("k") == "k#2"


async def test_forgetting_one_key_keeps_the_others(source: Source, clock: Clock) -> None:
    cache = cache_of(source, clock)
    await cache.load("a")
    await cache.load("b")
    cache.forget("a")
    assert cache.get("a") is None and cache.get("b") == "b#2"


async def test_a_caller_that_goes_away_does_not_cancel_the_load_of_the_others(
    source: Source, clock: Clock
) -> None:
    cache = cache_of(source, clock)
    source.release.clear()
    first = asyncio.ensure_future(cache.load("k"))
    second = asyncio.ensure_future(cache.load("k"))
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.sleep(0)
    source.release.set()
    assert await second == "k#1" and source.reads == ["k"]
    assert first.cancelled() and cache.get("k") == "k#1"


async def test_a_value_in_its_grace_is_answered_while_one_refresh_runs(
    source: Source, clock: Clock
) -> None:
    cache = cache_of(source, clock, grace=10.0)
    await cache.load("k")
    clock.now += 15.0  # expired, but within the grace
    answers = await asyncio.gather(*(cache.get_or_load("k") for _ in range(10)))
    assert answers == ["k#1"] * 10  # nobody waited for the load
    await asyncio.sleep(0.01)
    assert source.reads == ["k", "k"] and cache.get("k") == "k#2"


async def test_a_failed_refresh_drops_the_value_it_refreshed(source: Source, clock: Clock) -> None:
    cache = cache_of(source, clock, grace=10.0)
    await cache.load("k")
    clock.now += 15.0
    source.failing = True
    assert cache.get("k") == "k#1"  # its refresh fails in the background
    await asyncio.sleep(0.01)
    assert cache.get("k") is None
    with pytest.raises(ConnectionError):
        await cache.get_or_load("k")


async def test_a_value_past_its_grace_is_loaded_again_before_answering(
    source: Source, clock: Clock
) -> None:
    cache = cache_of(source, clock, grace=10.0)
    await cache.load("k")
    clock.now += 20.0
    assert cache.get("k") is None
    assert await cache.get_or_load("k") == "k#2"


async def test_each_value_may_get_its_own_lifetime_and_none_keeps_nothing(
    source: Source, clock: Clock
) -> None:
    cache = cache_of(source, clock, ttl=lambda value: 0.0 if value.startswith("gone") else 5.0)
    await cache.load("kept")
    await cache.load("gone")
    clock.now += 4.0
    assert cache.get("kept") == "kept#1" and cache.get("gone") is None
    clock.now += 1.0
    assert cache.get("kept") is None


async def test_a_cache_without_a_lifetime_still_shares_loads_but_keeps_nothing(
    source: Source, clock: Clock
) -> None:
    cache = cache_of(source, clock, ttl=0.0)
    assert list(await asyncio.gather(cache.load("k"), cache.load("k"))) == ["k#1", "k#1"]
    assert await cache.get_or_load("k") == "k#2"


async def test_a_full_cache_starts_over_instead_of_growing(source: Source, clock: Clock) -> None:
    cache = cache_of(source, clock, max_entries=2)
    for key in "abc":
        await cache.load(key)
    assert [cache.get(k) for k in "abc"] == ["a#1", "b#2", "c#3"]
    await cache.load("d")
    assert [cache.get(k) for k in "abcd"] == [None, None, None, "d#4"]
