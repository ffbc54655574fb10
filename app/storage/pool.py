"""The PostgreSQL connections of one process: a small pool that hands out and takes back a
connection without awaiting anything when one is free.

asyncpg's own pool wraps every acquire in a timeout and every release in a shielded task and
a fresh idle timer; for the one-statement units of work that make up most of the traffic, that
cost about twice the driver's work for the statement itself. This pool keeps the free
connections on a stack (the most recently used goes out first, so the others age out), queues
callers when all are taken, closes connections that stayed free past `idle_lifetime`, and
closes rather than reuses a connection given back past its `max_lifetime`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable

import asyncpg

from app.core.errors import Unavailable

log = logging.getLogger(__name__)

CLOSE_SECONDS = 5.0
# Each connection's lifetime is shortened by up to this share, so that connections opened
# together are not all replaced together.
LIFETIME_JITTER = 0.1

_UNREACHABLE = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)

Connect = Callable[[], Awaitable[asyncpg.Connection]]


class ConnectionPool:
    """At most `max_size` connections, opened on demand by `connect`."""

    def __init__(
        self,
        connect: Connect,
        *,
        max_size: int,
        timeout: float,
        idle_lifetime: float,
        max_lifetime: float | None = None,
    ):
        self._connect = connect
        self.max_size = max_size
        self.timeout = timeout
        self.idle_lifetime = idle_lifetime
        self.max_lifetime = max_lifetime or None  # 0: connections live as long as they work
        # Each connection with the time past which it is closed when given back.
        self._free: list[tuple[asyncpg.Connection, float, float]] = []  # (…, freed at, retire)
        self._busy: dict[asyncpg.Connection, float] = {}  # connection → retire at
        self._size = 0  # open or opening
        # Callers waiting for a connection: given one, or None for "a slot is free, open one".
        self._waiters: deque[asyncio.Future[asyncpg.Connection | None]] = deque()
        self._expiry: asyncio.TimerHandle | None = None
        self._closed = False
        self._all_back: asyncio.Event | None = None
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def size(self) -> int:
        """Connections open or being opened."""
        return self._size

    @property
    def free(self) -> int:
        return len(self._free)

    async def acquire(self) -> asyncpg.Connection:
        """A connection of this pool's; give it back with `release`."""
        while True:
            if self._closed:
                raise Unavailable("the database pool is closed")
            while self._free:
                conn, _, retire_at = self._free.pop()
                if not conn.is_closed():
                    self._busy[conn] = retire_at
                    return conn
                self._size -= 1
            if self._size < self.max_size:
                return await self._open()
            handed = await self._wait()
            if handed is not None:
                return handed  # marked busy when it was handed over
            # A slot came free (a connection was dropped): go round and open one.

    def release(self, conn: asyncpg.Connection) -> None:
        """Take back `conn`, free of any transaction (or closed: it is replaced on demand)."""
        retire_at = self._busy.pop(conn, None)
        if retire_at is None:
            return
        now = time.monotonic()
        if self._closed or conn.is_closed() or now >= retire_at:
            self._drop(conn)
            return
        if self._hand(conn):
            self._busy[conn] = retire_at
            return
        self._free.append((conn, now, retire_at))
        if self._expiry is None:
            self._expiry = asyncio.get_running_loop().call_later(self.idle_lifetime, self._expire)

    def discard(self, conn: asyncpg.Connection) -> None:
        """Take back a connection that failed, and close it. The free ones go too: idle at the
        same time, they are likely dead as well (the server restarted or went away) without
        knowing it yet, and the next caller should get a new connection, not one of them."""
        conn.terminate()
        free, self._free = self._free, []
        self._retire(free)
        self.release(conn)

    async def close(self) -> None:
        """Close every connection: free ones now, busy ones once they come back (terminated
        after a few seconds if they do not)."""
        self._closed = True
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(Unavailable("the database pool is closed"))
        free, self._free = self._free, []
        self._retire(free)
        if self._busy:
            self._all_back = asyncio.Event()
            try:
                await asyncio.wait_for(self._all_back.wait(), CLOSE_SECONDS)
            except TimeoutError:
                for conn in list(self._busy):
                    conn.terminate()
                    del self._busy[conn]
                    self._size -= 1
        if self._closing:
            await asyncio.wait(self._closing)

    # ---- internals ---------------------------------------------------------------------------

    async def _open(self) -> asyncpg.Connection:
        self._size += 1
        try:
            conn = await asyncio.wait_for(self._connect(), self.timeout)
        except BaseException as exc:
            self._size -= 1
            self._pass_slot()
            if isinstance(exc, _UNREACHABLE):
                # The driver's reason (a refused TLS upgrade, a wrong password) is for the
                # operator; callers, who may be clients, are told the database is unreachable.
                log.warning("cannot open a database connection: %s", exc)
                raise Unavailable(f"database unreachable: {type(exc).__name__}") from exc
            raise
        if self._closed:
            self._size -= 1
            await _close(conn)
            raise Unavailable("the database pool is closed")
        self._busy[conn] = self._retire_at()
        return conn

    def _retire_at(self) -> float:
        if self.max_lifetime is None:
            return math.inf
        lifetime = self.max_lifetime * (1 - LIFETIME_JITTER * random.random())
        return time.monotonic() + lifetime

    async def _wait(self) -> asyncpg.Connection | None:
        waiter: asyncio.Future[asyncpg.Connection | None] = (
            asyncio.get_running_loop().create_future()
        )
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self.timeout):
                return await waiter
        except BaseException as exc:
            # Handed a connection (or a slot) just as the wait ended: pass it on, not lose it.
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                handed = waiter.result()
                if handed is not None:
                    self.release(handed)
                else:
                    self._pass_slot()
            if isinstance(exc, TimeoutError):
                raise Unavailable("database unreachable: TimeoutError") from exc
            raise

    def _drop(self, conn: asyncpg.Connection) -> None:
        """Forget a connection that will not be used again, and let a waiter open another."""
        self._size -= 1
        if not conn.is_closed():
            self._close_later(conn)
        if self._closed:
            if not self._busy and self._all_back is not None:
                self._all_back.set()
            return
        self._pass_slot()

    def _pass_slot(self) -> None:
        self._hand(None)

    def _hand(self, handed: asyncpg.Connection | None) -> bool:
        """Give the first caller still waiting a connection (or a free slot, None)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(handed)
                return True
        return False

    def _retire(self, free: list[tuple[asyncpg.Connection, float, float]]) -> None:
        for conn, _, _ in free:
            self._size -= 1
            self._close_later(conn)

    def _close_later(self, conn: asyncpg.Connection) -> None:
        task = asyncio.get_running_loop().create_task(_close(conn))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _expire(self) -> None:
        """Close the connections free for longer than `idle_lifetime`; look again later."""
        self._expiry = None
        cutoff = time.monotonic() - self.idle_lifetime
        stale = 0
        while stale < len(self._free) and self._free[stale][1] <= cutoff:
            stale += 1
        expired, self._free = self._free[:stale], self._free[stale:]
        self._retire(expired)
        if self._free:
            wait = self._free[0][1] + self.idle_lifetime - time.monotonic()
            self._expiry = asyncio.get_running_loop().call_later(max(wait, 0.1), self._expire)


async def _close(conn: asyncpg.Connection) -> None:
    """Close politely, and give up on a server that does not answer."""
    try:
        await asyncio.wait_for(conn.close(), CLOSE_SECONDS)
    except Exception as exc:
        log.debug("closing a database connection: %s", exc)
        conn.terminate()
