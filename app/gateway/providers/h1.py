"""A small HTTP/1.1 client for the upstream calls that are one JSON POST and one JSON answer.

Almost every call the gateway makes is such a POST on a kept-alive connection, and for it a
general client costs more CPU than the rest of the gateway's work: at 32 connections aiohttp
spends about 220 us of CPU per request on the development machine, this client about 45
(`bench/http_clients.py` prints both). It does only what that call needs: one request at a
time per connection, a pool of kept-alive connections per origin (plain TCP, or TLS verified
against the system's CAs or `SSL_CERT_FILE`), a total deadline per request,
Content-Length, chunked and read-until-close bodies (parsed by httptools, the parser uvicorn
uses), and gzip or deflate bodies should a server send them unasked. Through an HTTP proxy
(`app/core/egress.py` decides which), an http origin gets absolute-form requests on connections
to the proxy, and an https origin a CONNECT tunnel with TLS to the origin inside, kept alive like
any other connection. Given an `OutboundPolicy`, each new direct connection goes to an address
of the host that the policy allowed, and each new one through a proxy is opened only if the host
resolves here to allowed addresses or not at all (a kept-alive one costs nothing more). Streams,
redirects and cookies are not its business: a 3xx is returned as any answer, never followed, and
streamed answers go through aiohttp.

A request that finds its kept-alive connection closed by the server before any byte of the
answer came back (the server's idle timeout, crossing our reuse) is sent once more on a new
connection: the server never read it. Any other failure closes the connection and raises.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import zlib
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import httptools

from app.core.egress import DIRECT, USER_AGENT, Proxy, ProxyRefused, ProxyRules, verified_context
from app.core.outbound import OutboundPolicy, connectable

# Bounds on what one answer may hold; a larger one closes the connection with an error.
MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_HEADER_BYTES = 64 * 1024
_SAFE_PATH = "/%:@!$&'()*+,;=-._~"
_SAFE_QUERY = _SAFE_PATH + "?"
_FORBIDDEN_IN_HEADERS = ("\r", "\n", "\0")


class ProtocolError(ConnectionError):
    """The server's answer was not HTTP this client can read, or broke a bound."""


class Disconnected(ConnectionError):
    """The connection closed before the answer was complete."""


@dataclass(slots=True)
class Response:
    status: int
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    body: bytes


class _Exchange:
    """What one request is waiting for on its connection."""

    __slots__ = ("answer", "chunks", "header_bytes", "headers", "size", "started", "status")

    def __init__(self, answer: asyncio.Future[Response]) -> None:
        self.answer = answer
        self.status = 0
        self.headers: dict[str, str] = {}
        self.chunks: list[bytes] = []
        self.size = 0
        self.header_bytes = 0
        self.started = False  # a byte of the answer arrived


class _Connection(asyncio.Protocol):
    """One kept-alive connection; httptools calls the `on_*` methods while parsing."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: _Exchange | None = None
        self.closed = False
        self.idle_since = 0.0

    # ---- transport events ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            self.close()  # nothing was asked: a server talking out of turn is not reused
            return
        exchange.started = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            # A bound our callbacks enforce arrives wrapped by the parser.
            cause = exc.__context__
            self._fail(
                cause
                if isinstance(cause, ProtocolError)
                else ProtocolError(f"unreadable HTTP answer: {exc}")
            )

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        exchange = self.exchange
        if exchange is None or exchange.answer.done():
            return
        if exchange.status and self._until_close(exchange):
            self._complete(exchange)  # the body of an answer without a length ends here
            return
        self.exchange = None
        error = Disconnected("the upstream closed the connection")
        if exc is not None:
            error.__cause__ = exc
        exchange.answer.set_exception(error)

    # ---- parser callbacks ----------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        exchange = self.exchange
        assert exchange is not None
        exchange.header_bytes += len(name) + len(value)
        if exchange.header_bytes > MAX_HEADER_BYTES:
            raise ProtocolError("the upstream's headers are too large")
        key = name.decode("latin-1").lower()
        exchange.headers[key] = value.decode("latin-1").strip()

    def on_headers_complete(self) -> None:
        exchange = self.exchange
        assert exchange is not None
        exchange.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        exchange = self.exchange
        assert exchange is not None
        exchange.size += len(body)
        if exchange.size > MAX_BODY_BYTES:
            raise ProtocolError("the upstream's answer is too large")
        exchange.chunks.append(body)

    def on_message_complete(self) -> None:
        exchange = self.exchange
        assert exchange is not None
        if 100 <= exchange.status < 200:
            # An interim answer (100 Continue, 103 Early Hints): the real one follows.
            exchange.status, exchange.headers, exchange.chunks = 0, {}, []
            return
        if not self.parser.should_keep_alive():
            self.close()
        self._complete(exchange)

    # ---- helpers --------------------------------------------------------------------------

    @staticmethod
    def _until_close(exchange: _Exchange) -> bool:
        headers = exchange.headers
        return "content-length" not in headers and "transfer-encoding" not in headers

    def _complete(self, exchange: _Exchange) -> None:
        self.exchange = None
        if exchange.answer.done():
            return
        body = exchange.chunks[0] if len(exchange.chunks) == 1 else b"".join(exchange.chunks)
        encoding = exchange.headers.get("content-encoding")
        if encoding is not None and encoding != "identity":
            try:
                body = _decode(body, encoding)
            except (ValueError, zlib.error) as exc:
                self.close()
                exchange.answer.set_exception(ProtocolError(f"unreadable body: {exc}"))
                return
        exchange.answer.set_result(Response(exchange.status, exchange.headers, body))

    def _fail(self, exc: Exception) -> None:
        exchange, self.exchange = self.exchange, None
        self.close()
        if exchange is not None and not exchange.answer.done():
            exchange.answer.set_exception(exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    @property
    def usable(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()


def _decode(body: bytes, encoding: str) -> bytes:
    decoded = body
    for coding in reversed([c.strip().lower() for c in encoding.split(",")]):
        if coding in ("gzip", "x-gzip"):
            decoded = _inflate(decoded, 16 + zlib.MAX_WBITS)
        elif coding == "deflate":
            try:
                decoded = _inflate(decoded, zlib.MAX_WBITS)
            except zlib.error:
                decoded = _inflate(decoded, -zlib.MAX_WBITS)  # raw deflate, as some servers send
        elif coding != "identity":
            raise ValueError(f"content encoding '{coding}' is not supported")
    return decoded


def _inflate(data: bytes, wbits: int) -> bytes:
    """`data` decompressed whole: every member of a gzip body, none cut short."""
    out: list[bytes] = []
    size = 0
    while True:
        inflater = zlib.decompressobj(wbits)
        chunk = inflater.decompress(data, MAX_BODY_BYTES - size + 1)
        if inflater.unconsumed_tail:
            raise ValueError("the decompressed answer is too large")
        chunk += inflater.flush()
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ValueError("the decompressed answer is too large")
        out.append(chunk)
        if not inflater.eof:
            raise ValueError("the compressed answer is cut short")
        data = inflater.unused_data
        if not data or wbits != 16 + zlib.MAX_WBITS:
            return b"".join(out)  # only gzip bodies may hold several members


class _ProxyAnswer(asyncio.Protocol):
    """Reads a proxy's answer to CONNECT up to the end of its head: its status code."""

    def __init__(self) -> None:
        self.status: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._head = bytearray()

    def data_received(self, data: bytes) -> None:
        if self.status.done():
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > MAX_HEADER_BYTES:
                self.status.set_exception(ProtocolError("the proxy's answer is too large"))
            return
        parts = bytes(self._head[: self._head.find(b"\r\n")]).split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            self.status.set_exception(ProtocolError("unreadable answer from the proxy"))
        elif len(self._head) > end + 4 and parts[1].startswith(b"2"):
            # Nothing may come before our TLS handshake; bytes here are not the origin's.
            self.status.set_exception(ProtocolError("the proxy sent data before the tunnel"))
        else:
            self.status.set_result(int(parts[1]))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.status.done():
            self.status.set_exception(Disconnected("the proxy closed the connection"))


class _Origin:
    """The connections to one scheme, host and port: idle ones most recent last."""

    def __init__(
        self,
        host: str,
        port: int,
        tls: ssl.SSLContext | None,
        max_connections: int,
        keepalive: float,
        proxy: Proxy | None = None,
        connect_head: bytes = b"",
        policy: OutboundPolicy | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.proxy = proxy
        self.connect_head = connect_head  # the CONNECT request of a tunnel through `proxy`
        self.policy = policy  # checks the addresses of each direct connection it opens
        self.max_connections = max_connections
        self.keepalive = keepalive
        self.idle: deque[_Connection] = deque()
        self.count = 0  # idle, busy and being opened
        self.closed = False
        self.waiters: deque[asyncio.Future[_Connection | None]] = deque()

    def take_idle(self) -> _Connection | None:
        """The most recently used idle connection still open, if any (never waits)."""
        idle = self.idle
        if idle:
            expired = time.monotonic() - self.keepalive
            while idle and idle[0].idle_since < expired:
                self._discard(idle.popleft())
            while idle:
                conn = idle.pop()
                if conn.usable:
                    return conn
                self._discard(conn)
        return None

    async def acquire(self, connect_timeout: float) -> tuple[_Connection, bool]:
        """A connection to send on (waiting for one at the limit), and whether it was used
        before."""
        conn = self.take_idle()
        if conn is not None:
            return conn, True
        while self.count >= self.max_connections:
            waiter: asyncio.Future[_Connection | None] = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            try:
                handed = await waiter
            except BaseException:
                # Whatever was handed to a caller that went away passes on to the next one.
                if waiter.done() and not waiter.cancelled():
                    handed = waiter.result()
                    if handed is not None:
                        self.release(handed)
                    else:
                        self._wake()
                elif waiter in self.waiters:
                    self.waiters.remove(waiter)
                raise
            if handed is not None:
                return handed, True
            # None: a connection closed, so there is room to open one (if nobody took it).
        return await self._open(connect_timeout), False

    async def _open(self, connect_timeout: float) -> _Connection:
        self.count += 1
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(connect_timeout):
                if self.proxy is not None and self.policy is not None:
                    await self.policy.check_through_proxy(self.host, self.port)
                if self.proxy is None and self.policy is not None:
                    conn = await self._connect_checked(self.policy)
                elif self.proxy is None:
                    _, conn = await loop.create_connection(
                        _Connection,
                        self.host,
                        self.port,
                        ssl=self.tls,
                        server_hostname=self.host if self.tls is not None else None,
                    )
                elif self.tls is None:
                    _, conn = await loop.create_connection(
                        _Connection, self.proxy.host, self.proxy.port
                    )
                else:
                    conn = await self._tunnel(self.proxy, self.tls)
        except BaseException:
            self.count -= 1
            self._wake()
            raise
        return conn

    async def _connect_checked(self, policy: OutboundPolicy) -> _Connection:
        """A connection to one of the host's addresses, each checked by `policy` first.

        The socket goes to the checked address itself, so a second DNS answer cannot lead
        elsewhere; TLS still verifies the certificate against the host name.
        """
        loop = asyncio.get_running_loop()
        last: OSError | None = None
        for address in await policy.checked_addresses(self.host, self.port):
            try:
                _, conn = await loop.create_connection(
                    _Connection,
                    connectable(address),
                    self.port,
                    ssl=self.tls,
                    server_hostname=self.host if self.tls is not None else None,
                )
            except OSError as exc:
                last = exc
                continue
            return conn
        assert last is not None
        raise last

    async def _tunnel(self, proxy: Proxy, tls: ssl.SSLContext) -> _Connection:
        """A connection through `proxy` by CONNECT, with TLS to the origin inside it."""
        loop = asyncio.get_running_loop()
        transport, answer = await loop.create_connection(_ProxyAnswer, proxy.host, proxy.port)
        try:
            transport.write(self.connect_head)
            status = await answer.status
            if not 200 <= status < 300:
                raise ProxyRefused(proxy, status)
            conn = _Connection()
            inner = await loop.start_tls(transport, conn, tls, server_hostname=self.host)
        except BaseException:
            transport.close()
            raise
        if inner is None:  # only for a transport already closing
            raise Disconnected("the proxy closed the connection")
        conn.connection_made(inner)  # start_tls hands the protocol over without telling it
        return conn

    def release(self, conn: _Connection) -> None:
        """Take back a connection after a complete answer (or a closed one)."""
        if not conn.usable or self.closed:
            self._discard(conn)
            return
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        conn.idle_since = time.monotonic()
        self.idle.append(conn)

    def _discard(self, conn: _Connection) -> None:
        conn.close()
        self.count -= 1
        self._wake()

    def _wake(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self, *, final: bool = False) -> None:
        """Close the idle connections; with `final`, busy ones close once released."""
        self.closed = self.closed or final
        while self.idle:
            self._discard(self.idle.pop())


class H1Client:
    """Pooled HTTP/1.1 requests with a body and a complete answer; one per event loop."""

    def __init__(
        self,
        *,
        max_connections: int = 100,
        keepalive: float = 30.0,
        tls: ssl.SSLContext | None = None,
        proxies: ProxyRules = DIRECT,
        user_agent: str = USER_AGENT,
        policy: OutboundPolicy | None = None,
    ) -> None:
        """`tls`: how https origins are verified (default: the system's CAs, or `SSL_CERT_FILE`
        and `SSL_CERT_DIR`, and the host name); `proxies`: which origins go through a proxy;
        `user_agent`: sent unless a request carries its own; `policy`: the addresses it may
        connect to (None: any; the gateway's pool always gives one)."""
        self._max_connections = max_connections
        self._keepalive = keepalive
        self._origins: dict[tuple[str, str, int], _Origin] = {}
        self._tls = tls
        self._proxies = proxies
        self._policy = policy
        self._agent = f"user-agent: {user_agent}"
        self._agent_line = f"{self._agent}\r\n".encode("latin-1")
        self._targets: dict[str, tuple[tuple[str, str, int], bytes]] = {}

    def _split(self, url: str) -> tuple[tuple[str, str, int], bytes]:
        """The origin of `url` and the start of its request head (request line and Host)."""
        known = self._targets.get(url)
        if known is not None:
            return known
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        port = parts.port or (443 if scheme == "https" else 80)
        host = parts.hostname
        if self._policy is not None:
            # Once per URL, before the host is written anywhere: a forbidden literal address, a
            # localhost or metadata name, or a host that is no plain name, is refused here.
            self._policy.check_host(host)
        shown = f"[{host}]" if ":" in host else host
        if parts.port is not None:
            shown += f":{port}"
        target = quote(parts.path or "/", safe=_SAFE_PATH)
        if parts.query:
            target += "?" + quote(parts.query, safe=_SAFE_QUERY)
        head = f"POST {target} HTTP/1.1\r\nhost: {shown}\r\n"
        proxy = self._proxies.select(scheme, host, port)
        if proxy is not None and scheme == "http":
            # To a proxy, the absolute form: it needs the origin to forward to.
            head = f"POST http://{shown}{target} HTTP/1.1\r\nhost: {shown}\r\n"
            if proxy.authorization is not None:
                head += f"proxy-authorization: {proxy.authorization}\r\n"
        known = ((scheme, host, port), head.encode("latin-1"))
        if len(self._targets) > 1000:
            self._targets.clear()
        self._targets[url] = known
        return known

    def _origin(self, key: tuple[str, str, int]) -> _Origin:
        origin = self._origins.get(key)
        if origin is None:
            scheme, host, port = key
            tls = None
            if scheme == "https":
                if self._tls is None:
                    self._tls = verified_context()
                tls = self._tls
            proxy = self._proxies.select(scheme, host, port)
            connect = b""
            if proxy is not None and tls is not None:
                authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                lines = [f"CONNECT {authority} HTTP/1.1", f"host: {authority}"]
                if proxy.authorization is not None:
                    lines.append(f"proxy-authorization: {proxy.authorization}")
                lines.append(self._agent)
                connect = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
            origin = _Origin(
                host,
                port,
                tls,
                self._max_connections,
                self._keepalive,
                proxy,
                connect,
                self._policy,
            )
            self._origins[key] = origin
        return origin

    async def post(
        self,
        url: str,
        headers: Mapping[str, str],
        body: bytes,
        *,
        total: float,
        connect_timeout: float,
    ) -> Response:
        """POST `body`; the answer, whatever its status. Raises `TimeoutError` after `total`
        seconds (connecting included), `ConnectionError` when the connection fails, and `ValueError`
        for a URL or header this client will not send."""
        key, start = self._split(url)
        head = [start]
        agent = self._agent_line
        for name, value in headers.items():
            if any(c in name or c in value for c in _FORBIDDEN_IN_HEADERS):
                raise ValueError(f"header {name!r} holds a line break or NUL")
            if len(name) == 10 and name.lower() == "user-agent":
                agent = b""
            head.append(f"{name}: {value}\r\n".encode("latin-1"))
        head.append(agent)
        head.append(b"content-length: %d\r\n\r\n" % len(body))
        request = b"".join(head) + body
        origin = self._origin(key)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + total
        for attempt in range(2):
            if attempt:
                # The other idle connections are likely as stale (a restarted server, say).
                origin.close()
            conn = origin.take_idle()
            reused = conn is not None
            if conn is None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError
                async with asyncio.timeout_at(deadline):
                    conn, reused = await origin.acquire(min(connect_timeout, remaining))
            exchange = _Exchange(loop.create_future())
            try:
                response = await self._exchange(origin, conn, exchange, request, deadline)
            except Disconnected:
                # Closed by the server as we reused it, before any byte of an answer: the
                # request was never read, so it goes once more on another connection.
                if attempt or not reused or exchange.started:
                    raise
                continue
            if response.status == 407 and origin.proxy is not None:
                raise ProxyRefused(origin.proxy, 407)
            return response
        raise AssertionError("unreachable")

    @staticmethod
    async def _exchange(
        origin: _Origin, conn: _Connection, exchange: _Exchange, request: bytes, deadline: float
    ) -> Response:
        loop = asyncio.get_running_loop()
        conn.exchange = exchange
        timer = loop.call_at(deadline, _expire, exchange.answer)
        try:
            assert conn.transport is not None
            conn.transport.write(request)
            response = await exchange.answer
        except BaseException:
            # Timed out, failed or cancelled mid-exchange: the connection's state is unknown.
            conn.exchange = None
            conn.close()
            origin.release(conn)
            raise
        finally:
            timer.cancel()
        origin.release(conn)
        return response

    def close(self) -> None:
        """Close every idle connection (busy ones close when their exchange ends)."""
        origins, self._origins = self._origins, {}
        for origin in origins.values():
            origin.close(final=True)


def _expire(answer: asyncio.Future[Response]) -> None:
    if not answer.done():
        answer.set_exception(TimeoutError())
