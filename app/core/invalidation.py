"""Cross-process cache invalidation over Redis pub/sub, with a safe fallback when it is down.

A process caches what it reads often (API keys, app configuration) and drops entries when any
process announces a change on one channel. While the subscription is not confirmed, messages
may be missed, so caches fall back to a one-second lifetime and are cleared on (re)connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import redis.asyncio as aioredis

log = logging.getLogger(__name__)

# Pub/sub channels are server-wide, unlike keys: the database number keeps installs that share
# one Redis server (on different databases) from clearing each other's caches.
CHANNEL = "gateway:invalidate:db{db}"
ALL = "*"
# What admission reads (app/usage/admission.py) and the admin API changes. Its items name one
# entry: `budgets` (the enabled budgets), `key:<id>` and `team:<id>` (their rate limits),
# `model:<id>` (its prices), `defaults` (the default rate limits). Defined here because the
# access, model and usage services all publish on it.
METERING_TOPIC = "metering"
# The routes a model or chain name resolves to (app/gateway/chat.py); items are the name, or
# `ALL` after a credential changed. Dispatched in the process that made the change.
ROUTES_TOPIC = "routes"
# How long a cached entry may be served when no invalidation message can reach this process.
UNSUBSCRIBED_TTL = 1.0
_PING_EVERY = 10.0
_BACKOFF_MAX = 5.0

Handler = Callable[[str], None]
V = TypeVar("V")


class InvalidationBus:
    """Publishes `topic:item` messages and hands the ones it receives to local handlers."""

    def __init__(self, redis: aioredis.Redis | None, *, shared: bool = True) -> None:
        # `shared=False`: this process is the only one using the data (one-process dev mode,
        # unit tests), so dispatching locally reaches every cache and nothing needs listening.
        self._redis = redis if shared else None
        db = redis.connection_pool.connection_kwargs.get("db", 0) if redis is not None else 0
        self.channel = CHANNEL.format(db=db)
        self._handlers: dict[str, list[Handler]] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.subscribed = not shared

    def on(self, topic: str, handler: Handler) -> None:
        """Call `handler(item)` whenever `topic` changes (`item` is `ALL` for everything)."""
        self._handlers.setdefault(topic, []).append(handler)

    def ttl(self, preferred: float) -> float:
        """How long a cache may keep an entry now: `preferred` only while messages can arrive."""
        return preferred if self.subscribed else min(preferred, UNSUBSCRIBED_TTL)

    async def publish(self, topic: str, item: str = ALL) -> None:
        """Drop `item` here at once, then tell every other process."""
        self.dispatch(topic, item)
        if self._redis is None:
            return
        try:
            await self._redis.publish(self.channel, f"{topic}:{item}")
        except Exception as exc:  # redis down: the others' short fallback lifetime still holds
            log.warning("cannot publish an invalidation of %s: %s", topic, exc)

    async def start(self) -> None:
        """Listen in the background until `stop`."""
        if self._task is None and self._redis is not None:
            self._task = asyncio.create_task(self._listen(), name="invalidation-listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._stopping = True
            self._task.cancel()
            await asyncio.wait([self._task], timeout=2.0)
            self._task = None
            self.subscribed = False

    def dispatch(self, topic: str, item: str = ALL) -> None:
        """Drop `item` in this process only (what `publish` does first)."""
        for handler in self._handlers.get(topic, ()):
            handler(item)

    def _dispatch_everything(self) -> None:
        for topic in self._handlers:
            self.dispatch(topic, ALL)

    async def _listen(self) -> None:
        backoff = 0.1
        while not self._stopping:
            try:
                await self._follow()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("invalidation channel lost (%s); retrying in %.1fs", exc, backoff)
            self.subscribed = False
            self._dispatch_everything()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)

    async def _follow(self) -> None:
        assert self._redis is not None
        pubsub = self._redis.pubsub()
        try:
            await pubsub.subscribe(self.channel)
            last_heard = time.monotonic()
            while not self._stopping:
                message: dict[str, Any] | None = await pubsub.get_message(timeout=1.0)
                now = time.monotonic()
                if message is None:
                    if now - last_heard > _PING_EVERY:
                        await pubsub.ping()  # a dead connection raises instead of idling forever
                        last_heard = now
                    continue
                last_heard = now
                kind = message.get("type")
                if kind == "subscribe":
                    # Anything may have changed while we were not listening.
                    self._dispatch_everything()
                    self.subscribed = True
                elif kind == "message":
                    data = message["data"]
                    text = data.decode() if isinstance(data, bytes) else str(data)
                    topic, _, item = text.partition(":")
                    self.dispatch(topic, item or ALL)
        finally:
            self.subscribed = False
            with contextlib.suppress(Exception):
                await pubsub.aclose()


class InvalidatedCache(Generic[V]):
    """A small in-process cache whose entries expire and are dropped on invalidation.

    A read that started before an invalidation must not store what it read (it may be the
    value just changed), so `fill` refuses values read under an older generation.
    """

    def __init__(self, bus: InvalidationBus, topic: str, *, ttl: float) -> None:
        self._bus = bus
        self._ttl = ttl
        self._entries: dict[str, tuple[V, float]] = {}
        self.generation = 0
        bus.on(topic, self.drop)

    def get(self, item: str) -> V | None:
        entry = self._entries.get(item)
        if entry is None:
            return None
        value, expires = entry
        if time.monotonic() >= expires:
            self._entries.pop(item, None)
            return None
        return value

    def fill(self, item: str, value: V, generation: int, *, ttl: float | None = None) -> None:
        """Keep `value` if nothing was invalidated since `generation` was read."""
        if generation != self.generation:
            return
        lifetime = self._bus.ttl(ttl if ttl is not None else self._ttl)
        self._entries[item] = (value, time.monotonic() + lifetime)

    def drop(self, item: str) -> None:
        self.generation += 1
        if item == ALL:
            self._entries.clear()
        else:
            self._entries.pop(item, None)
