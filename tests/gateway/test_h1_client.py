"""`H1Client` against real loopback servers that send hand-written HTTP bytes."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import ssl
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from app.core.errors import UpstreamRateLimited, UpstreamTimeout, UpstreamUnavailable
from app.core.outbound import OutboundPolicy
from app.credentials.entities import Provider
from app.gateway.providers import h1
from app.gateway.providers.base import Upstream
from app.gateway.providers.h1 import Disconnected, H1Client, ProtocolError, Response
from app.gateway.providers.http import HttpPool, post_json

# The longest any single wait in these tests may take before it counts as a hang.
GUARD = 2.0

# The test servers listen on loopback, which provider calls refuse unless allowed.
LOOPBACK = OutboundPolicy.parse("127.0.0.1,::1,localhost")


# ---- a raw HTTP server ----------------------------------------------------------------------


@dataclass
class Request:
    """One request as the server read it off the wire."""

    conn: int  # which accepted connection it came on, counting from 0
    method: str
    target: str
    headers: dict[str, str]  # lower-case names
    names: list[str]  # every header name as sent, in order
    body: bytes


@dataclass
class Peer:
    """The server's side of one accepted connection."""

    server: RawServer
    index: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    eof: asyncio.Event = field(default_factory=asyncio.Event)  # the client closed its side

    async def request(self) -> Request | None:
        """The next request on this connection, or None once the client closed it."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            self.eof.set()
            return None
        lines = head.decode("latin-1").split("\r\n")[:-2]
        method, target, _ = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        names: list[str] = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            names.append(name)
            headers[name.lower()] = value.strip()
        body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        request = Request(self.index, method, target, headers, names, body)
        self.server.requests.append(request)
        self.server.arrived.set()
        return request

    async def send(self, *parts: bytes, pause: float = 0.0) -> None:
        """Write `parts` one by one (with `pause` between them, so they leave separately)."""
        for i, part in enumerate(parts):
            if i and pause:
                await asyncio.sleep(pause)
            self.writer.write(part)
            await self.writer.drain()

    async def until_eof(self) -> None:
        """Read and drop whatever comes until the client closes the connection."""
        try:
            while await self.reader.read(65536):
                pass
        except ConnectionError:
            pass
        self.eof.set()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


Handler = Callable[[Peer], Awaitable[None]]


class RawServer:
    """A loopback TCP server running `handler` on each connection, counting what it sees."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.peers: list[Peer] = []
        self.requests: list[Request] = []
        self.arrived = asyncio.Event()
        self.open = 0
        self.max_open = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def accepted(self) -> int:
        return len(self.peers)

    def url(self, path: str = "/v1/chat") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def start(self, tls: ssl.SSLContext | None = None) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, ssl=tls)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = Peer(self, len(self.peers), reader, writer)
        self.peers.append(peer)
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        try:
            await self.handler(peer)
        finally:
            self.open -= 1
            writer.close()
            self._tasks.discard(task)

    async def wait_requests(self, count: int) -> None:
        async def enough() -> None:
            while len(self.requests) < count:
                self.arrived.clear()
                await self.arrived.wait()

        await asyncio.wait_for(enough(), GUARD)

    async def wait_eof(self, index: int, within: float = GUARD) -> None:
        """Returns once the client has closed connection `index` (TimeoutError after `within`)."""
        await asyncio.wait_for(self.peers[index].eof.wait(), within)

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()


def answer(
    body: bytes = b'{"ok": true}',
    status: str = "200 OK",
    headers: tuple[str, ...] = ("Content-Type: application/json",),
    length: int | None = None,
) -> bytes:
    """A complete answer with a Content-Length (`length` overrides the true one)."""
    size = len(body) if length is None else length
    head = [f"HTTP/1.1 {status}", *headers, f"Content-Length: {size}", "", ""]
    return "\r\n".join(head).encode("latin-1") + body


def echo(request: Request) -> bytes:
    return answer(b"echo:" + request.body)


def keep_alive(reply: Callable[[Request], bytes | None]) -> Handler:
    """Answer each request of a connection with `reply(request)`; None stalls that connection
    until the client closes it."""

    async def handler(peer: Peer) -> None:
        while (request := await peer.request()) is not None:
            data = reply(request)
            if data is None:
                await peer.until_eof()
                return
            await peer.send(data)

    return handler


def stall_first(server_requests: Callable[[], list[Request]]) -> Callable[[Request], bytes | None]:
    """A reply that never answers the first request the server gets, and echoes the others."""

    def reply(request: Request) -> bytes | None:
        return None if server_requests()[0] is request else echo(request)

    return reply


Serve = Callable[[Handler], Awaitable[RawServer]]
MakeClient = Callable[..., H1Client]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    servers: list[RawServer] = []

    async def start(handler: Handler) -> RawServer:
        server = RawServer(handler)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


@pytest.fixture
async def make_client() -> AsyncIterator[MakeClient]:
    clients: list[H1Client] = []

    def make(*, max_connections: int = 100, keepalive: float = 30.0) -> H1Client:
        client = H1Client(max_connections=max_connections, keepalive=keepalive)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()
    await asyncio.sleep(0)  # let the closed transports report it


@pytest.fixture
def client(make_client: MakeClient) -> H1Client:
    return make_client()


async def post(
    client: H1Client,
    url: str,
    body: bytes = b"{}",
    headers: dict[str, str] | None = None,
    *,
    total: float = GUARD,
) -> Response:
    return await asyncio.wait_for(
        client.post(url, headers or {}, body, total=total, connect_timeout=1.0), GUARD + 1
    )


def free_port() -> int:
    """A loopback port nothing listens on (bound once, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# ---- an answer and its request --------------------------------------------------------------


async def test_content_length_answer_returns_status_headers_and_body(
    serve: Serve, client: H1Client
) -> None:
    server = await serve(
        keep_alive(
            lambda _: answer(
                b'{"id": "r-1"}',
                status="201 Created",
                headers=("Content-Type: application/json", "X-Request-Id: r-1"),
            )
        )
    )
    response = await post(client, server.url("/v1/chat"), b'{"model": "m"}')
    assert response.status == 201
    assert response.headers == {
        "content-type": "application/json",
        "x-request-id": "r-1",
        "content-length": "13",
    }
    assert response.body == b'{"id": "r-1"}'


async def test_request_carries_method_target_host_headers_length_and_body(
    serve: Serve, client: H1Client
) -> None:
    server = await serve(keep_alive(echo))
    body = b'{"messages": [{"role": "user", "content": "hi"}]}'
    await post(
        client,
        server.url("/v1/chat?api-version=2024-01-01"),
        body,
        {"Authorization": "Bearer k-1", "x-trace-id": "abc"},
    )
    (request,) = server.requests
    assert request.method == "POST"
    assert request.target == "/v1/chat?api-version=2024-01-01"
    assert request.headers["host"] == f"127.0.0.1:{server.port}"
    assert request.headers["authorization"] == "Bearer k-1"
    assert request.headers["x-trace-id"] == "abc"
    assert [n.lower() for n in request.names].count("content-length") == 1
    assert request.headers["content-length"] == str(len(body))
    assert request.body == body


# ---- connection reuse -----------------------------------------------------------------------


async def test_sequential_requests_to_one_origin_share_one_connection(
    serve: Serve, client: H1Client
) -> None:
    server = await serve(keep_alive(echo))
    first = await post(client, server.url("/a"), b"1")
    second = await post(client, server.url("/b"), b"2")
    assert (first.body, second.body) == (b"echo:1", b"echo:2")
    assert server.accepted == 1
    assert [r.conn for r in server.requests] == [0, 0]


async def test_idle_connection_older_than_keepalive_is_not_reused(
    serve: Serve, make_client: MakeClient
) -> None:
    server = await serve(keep_alive(echo))
    client = make_client(keepalive=0.05)
    await post(client, server.url())
    await asyncio.sleep(0.1)
    await post(client, server.url())
    assert [r.conn for r in server.requests] == [0, 1]
    await server.wait_eof(0)  # the expired one was closed, not left open


async def test_concurrent_requests_never_open_more_than_max_connections(
    serve: Serve, make_client: MakeClient
) -> None:
    async def slow(peer: Peer) -> None:
        while (request := await peer.request()) is not None:
            await asyncio.sleep(0.1)
            await peer.send(echo(request))

    server = await serve(slow)
    client = make_client(max_connections=2)
    bodies = [str(i).encode() for i in range(5)]
    responses = await asyncio.gather(*(post(client, server.url(), b) for b in bodies))
    assert [r.body for r in responses] == [b"echo:" + b for b in bodies]
    assert server.max_open == 2
    assert server.accepted == 2


async def test_waiter_cancelled_as_it_is_woken_passes_the_free_slot_on(
    serve: Serve, make_client: MakeClient
) -> None:
    server = await serve(keep_alive(stall_first(lambda: server.requests)))
    client = make_client(max_connections=1)
    first = asyncio.create_task(post(client, server.url(), b"a"))
    await server.wait_requests(1)
    second = asyncio.create_task(post(client, server.url(), b"b"))
    third = asyncio.create_task(post(client, server.url(), b"c", total=0.5))
    await asyncio.sleep(0.05)  # both now wait for the single connection
    first.cancel()
    await asyncio.sleep(0)  # the first closes its connection and wakes the second
    second.cancel()  # ... which is cancelled before it can use the free slot
    await asyncio.gather(first, second, return_exceptions=True)
    response = await third
    assert response.body == b"echo:c"


# ---- how an answer's body ends --------------------------------------------------------------


async def test_chunked_answer_is_reassembled(serve: Serve, client: H1Client) -> None:
    async def chunked(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                b'6\r\n{"a": \r\n',
                b"a\r\n[1, 2, 3, \r\n",
                b"2\r\n4]\r\n1\r\n}\r\n",
                b"0\r\n\r\n",
                pause=0.01,
            )

    server = await serve(chunked)
    response = await post(client, server.url())
    assert response.body == b'{"a": [1, 2, 3, 4]}'
    assert response.headers["transfer-encoding"] == "chunked"


async def test_answer_ended_by_close_returns_body_and_next_request_reconnects(
    serve: Serve, client: H1Client
) -> None:
    async def until_close(peer: Peer) -> None:
        if await peer.request() is not None:
            await peer.send(b"HTTP/1.1 200 OK\r\n\r\nfirst part, ", b"second part", pause=0.01)
            await peer.close()

    server = await serve(until_close)
    first = await post(client, server.url())
    assert (first.status, first.body) == (200, b"first part, second part")
    second = await post(client, server.url())
    assert second.body == b"first part, second part"
    assert [r.conn for r in server.requests] == [0, 1]


async def test_connection_close_in_answer_is_honoured(serve: Serve, client: H1Client) -> None:
    # The server leaves the connection open and would answer on it: only the header says no.
    server = await serve(
        keep_alive(lambda r: answer(b"echo:" + r.body, headers=("Connection: close",)))
    )
    assert (await post(client, server.url(), b"1")).body == b"echo:1"
    assert (await post(client, server.url(), b"2")).body == b"echo:2"
    assert [r.conn for r in server.requests] == [0, 1]
    await server.wait_eof(0)


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda data: zlib.compress(data, wbits=-zlib.MAX_WBITS)),
    ],
    ids=["gzip", "deflate", "raw-deflate"],
)
async def test_compressed_answer_is_decoded(
    serve: Serve, client: H1Client, encoding: str, compress: Callable[[bytes], bytes]
) -> None:
    plain = b'{"text": "' + b"word " * 200 + b'"}'
    server = await serve(
        keep_alive(lambda _: answer(compress(plain), headers=(f"Content-Encoding: {encoding}",)))
    )
    response = await post(client, server.url())
    assert response.body == plain


async def test_a_gzip_body_of_several_members_is_decoded_whole(
    serve: Serve, client: H1Client
) -> None:
    body = gzip.compress(b"first half, ") + gzip.compress(b"second half")
    server = await serve(keep_alive(lambda _: answer(body, headers=("Content-Encoding: gzip",))))
    response = await post(client, server.url())
    assert response.body == b"first half, second half"


async def test_a_compressed_body_cut_short_raises_protocol_error(
    serve: Serve, client: H1Client
) -> None:
    body = gzip.compress(b"word " * 200)[:-12]
    server = await serve(keep_alive(lambda _: answer(body, headers=("Content-Encoding: gzip",))))
    with pytest.raises(ProtocolError, match="cut short"):
        await post(client, server.url())


async def test_interim_100_continue_is_skipped_for_the_final_answer(
    serve: Serve, client: H1Client
) -> None:
    async def interim(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(
                b"HTTP/1.1 100 Continue\r\nX-Interim: 1\r\n\r\n",
                answer(b"final", headers=("X-Final: 1",)),
                pause=0.01,
            )

    server = await serve(interim)
    response = await post(client, server.url())
    assert (response.status, response.body) == (200, b"final")
    assert response.headers["x-final"] == "1"
    assert "x-interim" not in response.headers


# ---- failures -------------------------------------------------------------------------------


async def test_timeout_raises_in_time_and_drops_the_connection(
    serve: Serve, client: H1Client
) -> None:
    server = await serve(keep_alive(stall_first(lambda: server.requests)))
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await post(client, server.url(), total=0.3)
    elapsed = time.monotonic() - started
    assert 0.2 <= elapsed < GUARD
    await server.wait_eof(0)
    response = await post(client, server.url(), b"again")
    assert response.body == b"echo:again"
    assert [r.conn for r in server.requests] == [0, 1]


async def test_keepalive_connection_closed_while_idle_is_replaced(
    serve: Serve, client: H1Client
) -> None:
    closed = asyncio.Event()

    async def answer_then_close(peer: Peer) -> None:
        request = await peer.request()
        if request is not None:
            await peer.send(echo(request))
            await asyncio.sleep(0.02)
            await peer.close()
            closed.set()

    server = await serve(answer_then_close)
    assert (await post(client, server.url(), b"1")).body == b"echo:1"
    await asyncio.wait_for(closed.wait(), GUARD)
    await asyncio.sleep(0.05)
    assert (await post(client, server.url(), b"2")).body == b"echo:2"
    assert [r.conn for r in server.requests] == [0, 1]


async def test_reused_connection_closed_before_any_answer_byte_is_retried_once(
    serve: Serve, client: H1Client
) -> None:
    # The first connection answers one request, then reads the next and closes unanswered.
    async def one_then_drop(peer: Peer) -> None:
        request = await peer.request()
        if request is not None and peer.index == 0:
            await peer.send(echo(request))
            await peer.request()
            await peer.close()
            return
        while request is not None:
            await peer.send(echo(request))
            request = await peer.request()

    server = await serve(one_then_drop)
    assert (await post(client, server.url(), b"1")).body == b"echo:1"
    assert (await post(client, server.url(), b"2")).body == b"echo:2"
    assert [(r.conn, r.body) for r in server.requests] == [(0, b"1"), (0, b"2"), (1, b"2")]


async def test_retry_after_a_dropped_reused_connection_is_one_on_a_new_connection(
    serve: Serve, client: H1Client
) -> None:
    # The first two requests are answered (together, so on two connections); every later one
    # is read and dropped unanswered, whatever the connection.
    async def two_then_drop_all(peer: Peer) -> None:
        while (request := await peer.request()) is not None and len(server.requests) <= 2:
            await server.wait_requests(2)
            await peer.send(echo(request))
        await peer.close()

    server = await serve(two_then_drop_all)
    await asyncio.gather(post(client, server.url("/a"), b"a"), post(client, server.url("/b")))
    assert server.accepted == 2
    with pytest.raises(Disconnected):
        await post(client, server.url("/dropped"), b"2")
    dropped = [r.conn for r in server.requests if r.target == "/dropped"]
    assert len(dropped) == 2  # sent once more, never a third time
    assert dropped[1] == 2  # ... on a new connection, not the other kept-alive one
    await server.wait_eof(0)  # which the client closed as likely stale too


async def test_answer_cut_short_raises_disconnected_without_retry(
    serve: Serve, client: H1Client
) -> None:
    async def then_cut(peer: Peer) -> None:
        while (request := await peer.request()) is not None:
            if request.target == "/cut":
                await peer.send(answer(b'{"partial', length=100))
                await peer.close()
                return
            await peer.send(echo(request))

    server = await serve(then_cut)
    await post(client, server.url("/first"))  # so the cut answer comes on a reused connection
    with pytest.raises(Disconnected):
        await post(client, server.url("/cut"))
    assert [r.target for r in server.requests] == ["/first", "/cut"]
    assert server.accepted == 1


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("x-note", "a\r\nx-evil: 1"),
        ("x-note", "a\nx-evil: 1"),
        ("x-note", "a\0b"),
        ("x-evil: 1\r\nx-note", "a"),
    ],
    ids=["crlf-in-value", "lf-in-value", "nul-in-value", "crlf-in-name"],
)
async def test_header_with_line_break_or_nul_is_refused_and_nothing_sent(
    serve: Serve, client: H1Client, name: str, value: str
) -> None:
    server = await serve(keep_alive(echo))
    with pytest.raises(ValueError):
        await post(client, server.url("/refused"), b"x", {name: value})
    await post(client, server.url("/after"))
    assert [r.target for r in server.requests] == ["/after"]
    assert "x-evil" not in server.requests[0].headers


@pytest.fixture
def small_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(h1, "MAX_BODY_BYTES", 1000)
    monkeypatch.setattr(h1, "MAX_HEADER_BYTES", 200)


def _chunked(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (
        len(body),
        body,
    )


@pytest.mark.parametrize(
    "payload",
    [
        answer(b"x" * 5000),
        _chunked(b"x" * 5000),
        b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 5000,
        answer(gzip.compress(b"x" * 5000), headers=("Content-Encoding: gzip",)),
        answer(b"{}", headers=(f"X-Big: {'v' * 300}",)),
    ],
    ids=["content-length", "chunked", "until-close", "gzip-expanding", "headers"],
)
@pytest.mark.usefixtures("small_bounds")
async def test_answer_over_a_bound_raises_protocol_error_and_drops_connection(
    serve: Serve, client: H1Client, payload: bytes
) -> None:
    async def big(peer: Peer) -> None:
        if await peer.request() is not None:
            await peer.send(payload)
            await peer.until_eof()

    server = await serve(big)
    with pytest.raises(ProtocolError):
        await post(client, server.url())
    await server.wait_eof(0)


@pytest.mark.parametrize(
    "garbage",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"HTTP/1.1 200 OK\r\nno colon on this line\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: twelve\r\n\r\n",
    ],
    ids=["not-http", "bad-header-line", "bad-length"],
)
async def test_answer_that_is_not_http_raises_protocol_error(
    serve: Serve, client: H1Client, garbage: bytes
) -> None:
    async def talk_nonsense(peer: Peer) -> None:
        if await peer.request() is not None:
            await peer.send(garbage)
            await peer.until_eof()  # left open: the client must notice by itself

    server = await serve(talk_nonsense)
    with pytest.raises(ProtocolError):
        await post(client, server.url())
    await server.wait_eof(0)


async def test_cancelled_request_closes_its_connection(serve: Serve, client: H1Client) -> None:
    server = await serve(keep_alive(stall_first(lambda: server.requests)))
    task = asyncio.create_task(post(client, server.url(), b"stalled"))
    await server.wait_requests(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await server.wait_eof(0)
    response = await post(client, server.url(), b"later")
    assert response.body == b"echo:later"
    assert [r.conn for r in server.requests] == [0, 1]


async def test_close_during_a_request_closes_that_connection_once_answered(
    serve: Serve, client: H1Client
) -> None:
    async def slow(peer: Peer) -> None:
        while (request := await peer.request()) is not None:
            await asyncio.sleep(0.05)
            await peer.send(echo(request))

    server = await serve(slow)
    task = asyncio.create_task(post(client, server.url(), b"busy"))
    await server.wait_requests(1)
    client.close()
    assert (await task).body == b"echo:busy"
    await server.wait_eof(0, within=0.5)


# ---- post_json ------------------------------------------------------------------------------


def _upstream(timeout: float = GUARD) -> Upstream:
    return Upstream(
        model_id="m",
        provider=Provider.OPENAI,
        provider_model="up-m",
        timeout=timeout,
        connect_timeout=1.0,
    )


@pytest.fixture
async def pool() -> AsyncIterator[HttpPool]:
    pool = HttpPool(policy=LOOPBACK)
    yield pool
    await pool.close()


async def test_post_json_sends_json_and_returns_the_answer(serve: Serve, pool: HttpPool) -> None:
    server = await serve(keep_alive(lambda _: answer(b'{"id": "c-1"}')))
    body = await asyncio.wait_for(
        post_json(pool, _upstream(), server.url(), {"x-key": "k"}, {"model": "up-m"}), GUARD
    )
    assert body == {"id": "c-1"}
    (request,) = server.requests
    assert request.headers["content-type"] == "application/json"
    assert request.headers["x-key"] == "k"
    assert request.body == b'{"model":"up-m"}'


async def test_post_json_maps_429_to_rate_limited_with_retry_after(
    serve: Serve, pool: HttpPool
) -> None:
    server = await serve(
        keep_alive(
            lambda _: answer(
                b'{"error": {"message": "slow down"}}',
                status="429 Too Many Requests",
                headers=("Retry-After: 7",),
            )
        )
    )
    with pytest.raises(UpstreamRateLimited) as caught:
        await asyncio.wait_for(post_json(pool, _upstream(), server.url(), {}, {}), GUARD)
    assert caught.value.retry_after == 7.0
    assert "slow down" in str(caught.value)


async def test_post_json_maps_refused_connection_to_unavailable(pool: HttpPool) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1/chat"
    with pytest.raises(UpstreamUnavailable) as caught:
        await asyncio.wait_for(post_json(pool, _upstream(), url, {}, {}), GUARD)
    assert isinstance(caught.value.__cause__, ConnectionRefusedError)


async def test_post_json_maps_timeout_to_upstream_timeout(serve: Serve, pool: HttpPool) -> None:
    server = await serve(keep_alive(lambda _: None))
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        await asyncio.wait_for(post_json(pool, _upstream(0.3), server.url(), {}, {}), GUARD)
    assert time.monotonic() - started < GUARD


# ---- TLS --------------------------------------------------------------------------------


@dataclass
class Certificate:
    server: ssl.SSLContext  # serves a self-signed certificate for 127.0.0.1 and localhost
    trusting: ssl.SSLContext  # a client context that trusts it (and verifies as usual)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gateway test upstream")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_file, key_file)
    trusting = ssl.create_default_context(cafile=str(cert_file))
    return Certificate(server, trusting)


async def test_an_https_origin_is_reached_over_verified_tls_on_a_kept_alive_connection(
    certificate: Certificate,
) -> None:
    server = RawServer(keep_alive(echo))
    await server.start(tls=certificate.server)
    client = H1Client(tls=certificate.trusting)
    try:
        url = f"https://127.0.0.1:{server.port}/v1/chat"
        first = await asyncio.wait_for(
            client.post(url, {}, b"one", total=GUARD, connect_timeout=GUARD), GUARD
        )
        second = await asyncio.wait_for(
            client.post(url, {}, b"two", total=GUARD, connect_timeout=GUARD), GUARD
        )
        assert (first.body, second.body) == (b"echo:one", b"echo:two")
        assert server.accepted == 1
        assert server.requests[0].headers["host"] == f"127.0.0.1:{server.port}"
    finally:
        client.close()
        await server.stop()


async def test_an_https_origin_whose_certificate_is_not_trusted_is_refused(
    certificate: Certificate,
) -> None:
    server = RawServer(keep_alive(echo))
    await server.start(tls=certificate.server)
    pool = HttpPool(policy=LOOPBACK)
    upstream = Upstream(model_id="m", provider=Provider.OPENAI, provider_model="m")
    try:
        with pytest.raises(UpstreamUnavailable) as refused:
            # The default verification: the system's CAs, which never signed this one.
            await asyncio.wait_for(
                post_json(pool, upstream, f"https://127.0.0.1:{server.port}/v1/chat", {}, {}),
                GUARD,
            )
        assert isinstance(refused.value.__cause__, ssl.SSLCertVerificationError)
        assert server.requests == []
    finally:
        await pool.close()
        await server.stop()
