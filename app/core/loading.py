"""An in-process cache that loads each missing value once for all the callers asking at once."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class LoadingCache(Generic[K, V]):
    """Values read by `load(key)`, kept for a lifetime, forgotten on `forget` or `clear`.

    When a value is missing or expires under load, every concurrent caller would otherwise
    start its own read (and overflow the connection pool): they await one shared load. A
    value that expired less than `grace` seconds ago is still answered while one refresh runs
    in the background, so no caller waits for the database. A failed load reaches every
    caller waiting for it, is not kept, and drops the value it was refreshing. A load that
    began before a `forget` or `clear` may hold what was just changed, so it is not kept, and
    callers arriving after the invalidation start a new one instead of joining it. A caller
    that goes away (a client disconnect) does not cancel the load the others wait for.

    `ttl` is the lifetime of every value, or a function giving each value its own (read when
    it is stored); a value whose lifetime is not positive is not kept. `None` is not a value
    this cache can hold: a load that answers it is loaded again by the next caller.
    """

    def __init__(
        self,
        load: Callable[[K], Awaitable[V]],
        *,
        ttl: float | Callable[[V], float],
        grace: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int | None = None,
    ) -> None:
        self._load = load
        self._ttl = ttl
        self._grace = grace
        self.clock = clock
        self._max_entries = max_entries
        self._entries: dict[K, tuple[V, float]] = {}
        self._loading: dict[K, asyncio.Future[V]] = {}
        self._generation = 0

    def get(self, key: K) -> V | None:
        """The value kept for `key`, or None when a caller must wait for `load`.

        A value in its grace period is answered, and its refresh started if none runs.
        """
        entry = self._entries.get(key)
        if entry is None:
            return None
        value, expires = entry
        now = self.clock()
        if now < expires:
            return value
        if now < expires + self._grace:
            self._start(key)
            return value
        del self._entries[key]
        return None

    async def load(self, key: K) -> V:
        """Wait for the load of `key` in flight, starting it when none is."""
        return await asyncio.shield(self._start(key))

    async def get_or_load(self, key: K) -> V:
        """The value kept for `key`, else the one its shared load returns."""
        value = self.get(key)
        if value is None:
            value = await self.load(key)
        return value

    def forget(self, key: K) -> None:
        """Drop `key`'s value and its load in flight (the stored data changed)."""
        self._generation += 1
        self._entries.pop(key, None)
        self._loading.pop(key, None)

    def clear(self) -> None:
        """Drop every value and every load in flight."""
        self._generation += 1
        self._entries.clear()
        self._loading.clear()

    def _start(self, key: K) -> asyncio.Future[V]:
        pending = self._loading.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._load(key))
            self._loading[key] = pending
            pending.add_done_callback(functools.partial(self._loaded, key, self._generation))
        return pending

    def _loaded(self, key: K, generation: int, done: asyncio.Future[V]) -> None:
        if self._loading.get(key) is done:
            del self._loading[key]
        if generation != self._generation:
            if not done.cancelled():
                done.exception()  # retrieved: the callers have it
            return
        if done.cancelled() or done.exception() is not None:
            self._entries.pop(key, None)  # no stale answer after a failed read
            return
        value = done.result()
        lifetime = self._ttl(value) if callable(self._ttl) else self._ttl
        if lifetime <= 0:
            return
        if self._max_entries is not None and len(self._entries) > self._max_entries:
            self._entries.clear()
        self._entries[key] = (value, self.clock() + lifetime)
