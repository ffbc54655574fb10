"""Periodic jobs that run once per tick across every worker process.

A small loop rather than a scheduler library: the tasks are a handful of fixed intervals, and
the only hard part — exactly one run per tick however many processes run the loop — is one
`SET key NX` in Redis per tick, keyed by the tick's number.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeriodicTask:
    """A named coroutine function run every `interval` seconds."""

    name: str
    interval: float
    run: Callable[[], Awaitable[Any]]


class TickLock(Protocol):
    async def acquire(self, name: str, tick: int, interval: float) -> bool:
        """True for exactly one caller per (name, tick) across all processes."""
        ...


class LocalTickLock:
    """For one process (memory storage, fakeredis): ticks are unique within the process."""

    def __init__(self) -> None:
        self._last: dict[str, int] = {}

    async def acquire(self, name: str, tick: int, interval: float) -> bool:
        if self._last.get(name, -1) >= tick:
            return False
        self._last[name] = tick
        return True


class RedisTickLock:
    """One `SET NX` per tick in Redis: whoever sets it first runs that tick."""

    def __init__(self, client: Any, owner: str, *, prefix: str = "gateway:periodic") -> None:
        self._client = client  # a redis.asyncio.Redis
        self._owner = owner
        self._prefix = prefix

    async def acquire(self, name: str, tick: int, interval: float) -> bool:
        key = f"{self._prefix}:{name}:{tick}"
        won = await self._client.set(key, self._owner, nx=True, ex=max(2, int(interval * 4)))
        if won:
            history = f"{self._prefix}:{name}:runs"
            await self._client.rpush(history, f"{tick}:{self._owner}")
            await self._client.ltrim(history, -1000, -1)
        return bool(won)


class PeriodicRunner:
    """Runs each task at most once per tick of its interval, until `stop` is set."""

    def __init__(self, tasks: list[PeriodicTask], lock: TickLock, *, granularity: float = 0.1):
        self._tasks = tasks
        self._lock = lock
        self._granularity = granularity
        self._last: dict[str, int] = {}

    async def run_once(self) -> list[str]:
        """Run every task whose tick came and that this process won; returns their names."""
        ran: list[str] = []
        now = time.time()
        for task in self._tasks:
            tick = int(now // task.interval)
            if self._last.get(task.name) == tick:
                continue
            self._last[task.name] = tick
            try:
                if not await self._lock.acquire(task.name, tick, task.interval):
                    continue
                await task.run()
                ran.append(task.name)
            except Exception:
                log.exception("periodic task %s failed; it runs again next tick", task.name)
        return ran

    async def run_forever(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.run_once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self._granularity)
