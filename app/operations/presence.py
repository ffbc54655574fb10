"""Which workers are alive: a heartbeat of each worker process in Redis, a second fresh.

A job's lease lasts long enough that a slow job keeps its worker; a worker that died is known
much sooner, because its heartbeat stops. Each worker process stamps its id in one sorted set
(`PRESENCE_KEY`, scored by Redis's own clock, so hosts' clocks need not agree) every fraction of
`ttl` from a thread of its own (`PresenceBeat`), and takes its entry out when it stops. The
sweeper asks which owners of running jobs have an entry older than `ttl` (`Presence.gone`) and
hands their jobs back at once. An owner without an entry (one that left, an older release, a
Redis that lost its data) is not judged here: its lease decides, as before.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection
from typing import Any, Protocol

log = logging.getLogger(__name__)

PRESENCE_KEY = "gateway:workers"

# Stamps ARGV[1] with Redis's time in milliseconds.
_BEAT = """
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], t[1] * 1000 + math.floor(t[2] / 1000), ARGV[1])
return 1
"""

# Of ARGV[2..], those whose stamp is older than ARGV[1] milliseconds; entries an hour old go.
_GONE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ttl = tonumber(ARGV[1])
local gone = {}
for i = 2, #ARGV do
  local stamp = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if stamp and now - tonumber(stamp) > ttl then gone[#gone + 1] = ARGV[i] end
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 3600000)
return gone
"""


class WorkerPresence(Protocol):
    """What the sweeper asks about the owners of running jobs."""

    ttl: float

    async def gone(self, workers: Collection[str]) -> set[str]:
        """Those of `workers` known to have stopped beating (not those never heard of)."""
        ...


class Presence:
    """Tells which workers stopped beating (on the async Redis client the sweeper has)."""

    def __init__(self, redis: Any, *, ttl: float) -> None:
        self._gone = redis.register_script(_GONE)
        self.ttl = ttl

    async def gone(self, workers: Collection[str]) -> set[str]:
        """Those of `workers` whose last heartbeat is older than `ttl`."""
        if not workers:
            return set()
        found = await self._gone(keys=[PRESENCE_KEY], args=[int(self.ttl * 1000), *workers])
        return {w.decode() if isinstance(w, bytes) else str(w) for w in found}


class PresenceBeat:
    """Stamps one worker's heartbeat from a thread of its own while the process lives.

    A thread rather than the event loop: a loop busy with a long stretch of work still has a
    live process (its lease guards a stuck loop), and a killed process stops beating at once.
    """

    def __init__(self, redis: Any, worker_id: str, *, ttl: float) -> None:
        self._redis = redis  # a blocking client (redis.Redis), safe to share between threads
        self._beat = redis.register_script(_BEAT)
        self.worker_id = worker_id
        self.every = ttl / 4
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        self._beat(keys=[PRESENCE_KEY], args=[self.worker_id])

    def start(self) -> None:
        """Beat now (before any job is claimed), then every `ttl / 4` seconds."""
        try:
            self.beat()
        except Exception:
            log.exception("worker heartbeat failed; its jobs rest on their leases")
        self._thread = threading.Thread(target=self._run, name="presence", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.beat()
            except Exception:
                log.warning("worker heartbeat failed; trying again", exc_info=True)

    def stop(self) -> None:
        """Stop beating and take the entry out: a worker that left is judged by its leases."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        try:
            self._redis.zrem(PRESENCE_KEY, self.worker_id)
        except Exception:
            log.warning("could not take the worker's heartbeat out", exc_info=True)
