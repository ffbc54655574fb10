"""A lean Redis client for the scripts every chat call runs: one pipelined connection.

Admitting a call is one EVALSHA; through redis-py's asyncio pipeline that costs about 130 us
of CPU on this machine (connection pool, command packing, parser layers), through this client
about 12. It sends every command on one connection and matches replies in order (RESP is
pipelined by design, and Redis runs commands one at a time anyway), parsing with hiredis.

It offers the part of redis-py's interface that `Metering` uses — `register_script`,
`pipeline(transaction=False)` with `evalsha` and `execute(raise_on_error=False)`, `set` and
`aclose` — and raises redis-py's exceptions, so either client serves. A command whose caller
went away (a timeout, a cancel) keeps its place in line and its reply is dropped; a broken
connection fails every command in flight and the next command connects again. So does a
silent one: when commands have waited `reply_timeout` seconds without any reply (a hung server,
a network gone without a reset), the next command gives that connection up and makes another.

It connects where and as the process's other clients do, from the same `RedisEndpoint`
(`app.core.redis_url`): TCP, TLS with the context redis-py would build, or a unix socket, then
AUTH with the user and password and SELECT of the database.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import hiredis
from redis.exceptions import (
    AuthenticationError,
    NoScriptError,
    ResponseError,
)
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)

from app.core.redis_url import RedisEndpoint, parse_redis_url

Arg = str | bytes | int | float


def _error(message: str) -> ResponseError:
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message)
    return ResponseError(message)


def pack(args: Sequence[Arg]) -> bytes:
    """One command in RESP (hiredis writes it, in C)."""
    packed: bytes = hiredis.pack_command(tuple(args))  # type: ignore[arg-type]  # stub: 1-tuple
    return packed


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader()
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.lost = False
        # Since when commands have waited without a reply coming (meaningful while waiting).
        self.quiet_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:
                self._fail(RedisConnectionError(f"unreadable reply from Redis: {exc}"))
                return
            if reply is False:
                return
            if not self.waiting:
                self._fail(RedisConnectionError("a reply from Redis that nothing asked for"))
                return
            self.quiet_since = time.monotonic()
            waiter = self.waiting.popleft()
            if waiter.done():
                continue  # its caller went away; the reply keeps the order
            if isinstance(reply, hiredis.ReplyError):
                waiter.set_exception(_error(str(reply)))
            else:
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        error = RedisConnectionError("the connection to Redis was lost")
        if exc is not None:
            error.__cause__ = exc
        self._fail(error)

    def _fail(self, error: Exception) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()
        waiting, self.waiting = self.waiting, deque()
        for waiter in waiting:
            if not waiter.done():
                waiter.set_exception(error)

    def send(self, data: bytes, count: int) -> list[asyncio.Future[Any]]:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in range(count)]
        if not self.waiting:
            self.quiet_since = time.monotonic()
        self.waiting.extend(futures)
        self.transport.write(data)
        return futures


class PipelinedRedis:
    """See the module docstring. One per event loop (its connection belongs to the loop)."""

    def __init__(
        self,
        endpoint: RedisEndpoint | str,
        *,
        connect_timeout: float = 2.0,
        reply_timeout: float = 5.0,
    ) -> None:
        # The endpoint every client of the process shares (`Settings.redis_endpoint`), or a URL.
        if isinstance(endpoint, str):
            endpoint = parse_redis_url(endpoint)
        self.endpoint = endpoint
        self._ssl = endpoint.ssl_context()
        self._connect_timeout = connect_timeout
        self._reply_timeout = reply_timeout
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None

    # ---- the interface `Metering` uses ------------------------------------------------------

    def register_script(self, source: str) -> Script:
        return Script(self, source)

    def pipeline(self, transaction: bool = False) -> Pipeline:
        if transaction:
            raise ValueError("transactions are not supported")
        return Pipeline(self)

    async def execute_command(self, *args: Arg) -> Any:
        (reply,) = await self._send([args])
        return (await _replies([reply], raise_on_error=True))[0]

    async def set(
        self, name: str, value: Arg, *, nx: bool = False, ex: int | None = None
    ) -> bool | None:
        args: list[Arg] = ["SET", name, value]
        if ex is not None:
            args += ["EX", ex]
        if nx:
            args.append("NX")
        reply = await self.execute_command(*args)
        return True if reply == b"OK" else None

    async def aclose(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()

    # ---- connection -------------------------------------------------------------------------

    async def _send(self, commands: Sequence[Sequence[Arg]]) -> list[asyncio.Future[Any]]:
        protocol = self._protocol
        if protocol is not None and protocol.waiting and self._silent(protocol):
            protocol._fail(RedisConnectionError("Redis stopped answering on this connection"))
        if protocol is None or protocol.lost or protocol.loop is not asyncio.get_running_loop():
            protocol = await self._connection()
        data = b"".join(pack(command) for command in commands)
        return protocol.send(data, len(commands))

    def _silent(self, protocol: _Protocol) -> bool:
        return time.monotonic() - protocol.quiet_since > self._reply_timeout

    async def _connection(self) -> _Protocol:
        # Concurrent callers share one connection attempt; a finished one (its caller went
        # away before clearing it) is never reused, its connection may since have been lost.
        if (
            self._connecting is None
            or self._connecting.done()
            or self._connecting.get_loop() is not asyncio.get_running_loop()
        ):
            self._connecting = asyncio.ensure_future(self._connect())
            # Retrieved here too, so a failure nobody waits for any more is not reported.
            self._connecting.add_done_callback(_retrieve)
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        endpoint = self.endpoint
        protocol: _Protocol | None = None
        try:
            async with asyncio.timeout(self._connect_timeout):
                if endpoint.path is not None:
                    _, protocol = await loop.create_unix_connection(_Protocol, endpoint.path)
                else:
                    _, protocol = await loop.create_connection(
                        _Protocol,
                        endpoint.host,
                        endpoint.port,
                        ssl=self._ssl,
                        server_hostname=endpoint.host if self._ssl is not None else None,
                    )
                setup: list[Sequence[Arg]] = []
                if endpoint.password is not None:
                    if endpoint.username is not None:
                        setup.append(("AUTH", endpoint.username, endpoint.password))
                    else:
                        setup.append(("AUTH", endpoint.password))
                if endpoint.db:
                    setup.append(("SELECT", endpoint.db))
                if setup:
                    replies = protocol.send(b"".join(pack(c) for c in setup), len(setup))
                    for reply in replies:
                        await reply
        except BaseException as exc:
            # A connection made but not set up (AUTH refused, or no answer in time) is closed.
            if protocol is not None and protocol.transport is not None:
                protocol.transport.close()
            if isinstance(exc, ResponseError):
                raise AuthenticationError(str(exc)) from exc
            if isinstance(exc, ssl.SSLCertVerificationError):
                raise RedisConnectionError(
                    f"the TLS certificate of Redis at {endpoint.address} failed verification "
                    f"({exc.verify_message}): ssl_ca_certs in REDIS_URL names the CA to trust"
                ) from exc
            if isinstance(exc, OSError | TimeoutError):
                raise RedisConnectionError(
                    f"cannot connect to Redis at {endpoint.address}: {exc!r}"
                ) from exc
            raise
        self._protocol = protocol
        return protocol


class Script:
    """A Lua script run by its SHA1, loaded into Redis when Redis does not know it."""

    def __init__(self, client: PipelinedRedis, source: str) -> None:
        self.client = client
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    async def __call__(self, keys: Sequence[Arg] = (), args: Sequence[Arg] = ()) -> Any:
        command: tuple[Arg, ...] = (len(keys), *keys, *args)
        try:
            return await self.client.execute_command("EVALSHA", self.sha, *command)
        except NoScriptError:
            return await self.client.execute_command("EVAL", self.source, *command)


class Pipeline:
    """Commands sent together, one reply (or error) each, in order."""

    def __init__(self, client: PipelinedRedis) -> None:
        self._client = client
        self._commands: list[tuple[Arg, ...]] = []

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Arg) -> Pipeline:
        self._commands.append(("EVALSHA", sha, numkeys, *keys_and_args))
        return self

    def execute_command(self, *args: Arg) -> Pipeline:
        self._commands.append(args)
        return self

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        commands, self._commands = self._commands, []
        if not commands:
            return []
        futures = await self._client._send(commands)
        return await _replies(futures, raise_on_error=raise_on_error)


async def _replies(futures: list[asyncio.Future[Any]], *, raise_on_error: bool) -> list[Any]:
    """The replies in order; an error reply is raised, or given as a value when
    `raise_on_error` is false. A caller that stops waiting (cancelled, or a reply raised)
    gives up the rest: their replies are dropped when they come."""
    replies: list[Any] = []
    try:
        for future in futures:
            try:
                replies.append(await future)
            except ResponseError as exc:
                if raise_on_error:
                    raise
                replies.append(exc)
    except BaseException:
        for future in futures:
            if not future.done():
                future.cancel()
            elif not future.cancelled():
                future.exception()  # retrieved: a failure already reported once
        raise
    return replies


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
