"""Upstream calls in a corporate network: through an HTTP proxy, past it by NO_PROXY, with the
operator's CAs, and naming themselves. JSON calls (H1Client) and streams (aiohttp) alike, on
real loopback sockets: a forwarding proxy written here, and the fake upstream in plain and TLS."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import ssl
import subprocess
import traceback
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiohttp import web

from app import __version__
from app.core.errors import UpstreamUnavailable
from app.core.outbound import OutboundPolicy
from app.credentials.entities import Provider
from app.gateway.providers.base import Upstream
from app.gateway.providers.http import HttpPool, open_stream, post_json, sse_events
from app.gateway.providers.openai import OpenAIProvider
from tests.gateway.upstream import FakeUpstream, free_port
from tests.tls import Authority, make_authority

# The longest any single call in these tests may take before it counts as a hang.
GUARD = 3.0
BODY = {"messages": [{"role": "user", "content": "hello there"}]}
ANSWER = "echo: hello there"

# The test servers listen on loopback, which provider calls refuse unless allowed.
LOOPBACK = OutboundPolicy.parse("127.0.0.1,::1,localhost")


# ---- a forwarding proxy -------------------------------------------------------------------


@dataclass
class Seen:
    """One request as the proxy read it: its line, and its headers in order."""

    line: str
    headers: list[tuple[str, str]]  # lower-case names

    @property
    def authorization(self) -> str | None:
        return next((v for n, v in self.headers if n == "proxy-authorization"), None)


class ForwardProxy:
    """An HTTP proxy on loopback: CONNECT tunnels, and absolute-form requests forwarded on a
    connection to the origin; answers 407 when `required` is set and not what it got."""

    def __init__(self, required: str | None = None) -> None:
        self.required = required
        self.seen: list[Seen] = []
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def lines(self) -> list[str]:
        return [seen.line for seen in self.seen]

    async def start(self) -> ForwardProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 1)

    def _track(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._track(task)
        self.connections += 1
        origin: asyncio.StreamWriter | None = None
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                line, *rest = head.decode("latin-1").split("\r\n")[:-2]
                headers = [
                    (n.strip().lower(), v.strip()) for n, _, v in (h.partition(":") for h in rest)
                ]
                seen = Seen(line, headers)
                self.seen.append(seen)
                body = await reader.readexactly(int(dict(headers).get("content-length", "0")))
                if self.required is not None and seen.authorization != self.required:
                    writer.write(
                        b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                        b'Proxy-Authenticate: Basic realm="test"\r\nContent-Length: 0\r\n\r\n'
                    )
                    await writer.drain()
                    continue
                method, target, _ = line.split(" ", 2)
                if method == "CONNECT":
                    host, _, port = target.rpartition(":")
                    inner_reader, inner = await asyncio.open_connection(host.strip("[]"), int(port))
                    writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    await asyncio.gather(_pipe(reader, inner), _pipe(inner_reader, writer))
                    return
                if origin is None:
                    url = urlsplit(target)
                    assert url.scheme == "http" and url.hostname, f"not absolute-form: {line}"
                    back, origin = await asyncio.open_connection(url.hostname, url.port or 80)
                    self._track(asyncio.create_task(_pipe(back, writer)))
                # Forwarded as it came (servers accept the absolute form), minus what was ours.
                kept = [f"{n}: {v}" for n, v in headers if not n.startswith("proxy-")]
                origin.write("\r\n".join([line, *kept, "", ""]).encode("latin-1") + body)
                await origin.drain()
        except asyncio.CancelledError:
            return  # stopped; asyncio would log a cancelled connection callback as an error
        finally:
            if origin is not None:
                origin.close()
            writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


# ---- fixtures -----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """No proxy or CA setting of the machine running the tests leaks into them."""
    for name in list(os.environ):
        if name.lower().endswith("_proxy") or name in ("SSL_CERT_FILE", "SSL_CERT_DIR"):
            monkeypatch.delenv(name)
    monkeypatch.delenv("REQUEST_METHOD", raising=False)
    yield monkeypatch


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    return make_authority(tmp_path_factory.mktemp("ca"))


@asynccontextmanager
async def serving(tls: ssl.SSLContext | None = None) -> AsyncIterator[FakeUpstream]:
    upstream = FakeUpstream(port=free_port())
    runner = web.AppRunner(upstream.app(), handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", upstream.port, ssl_context=tls).start()
    try:
        yield upstream
    finally:
        await runner.cleanup()


@pytest.fixture
async def plain() -> AsyncIterator[FakeUpstream]:
    async with serving() as upstream:
        yield upstream


@pytest.fixture
async def secure(authority: Authority) -> AsyncIterator[FakeUpstream]:
    async with serving(authority.server) as upstream:
        yield upstream


@pytest.fixture
async def proxy() -> AsyncIterator[ForwardProxy]:
    server = await ForwardProxy().start()
    yield server
    await server.stop()


MakePool = Callable[[], HttpPool]


@pytest.fixture
async def make_pool() -> AsyncIterator[MakePool]:
    """Fresh pools, each reading the environment as it is when made."""
    pools: list[HttpPool] = []

    def make() -> HttpPool:
        pools.append(HttpPool(policy=LOOPBACK))
        return pools[-1]

    yield make
    for pool in pools:
        await pool.close()


def http_base(upstream: FakeUpstream) -> str:
    return f"http://127.0.0.1:{upstream.port}"


def https_base(upstream: FakeUpstream) -> str:
    return f"https://127.0.0.1:{upstream.port}"


def model_at(base: str) -> Upstream:
    return Upstream(
        model_id="m",
        provider=Provider.OPENAI,
        provider_model="up-m",
        base_url=base + "/v1",
        timeout=GUARD,
        connect_timeout=GUARD,
    )


async def chat(pool: HttpPool, base: str) -> str:
    answer = await asyncio.wait_for(OpenAIProvider(pool).chat(model_at(base), BODY), GUARD)
    return str(answer["choices"][0]["message"]["content"])


async def stream(pool: HttpPool, base: str) -> str:
    async def collect() -> str:
        text = ""
        async for chunk in OpenAIProvider(pool).stream(model_at(base), BODY):
            for choice in chunk["choices"]:
                text += choice["delta"].get("content") or ""
        return text

    return await asyncio.wait_for(collect(), GUARD)


# ---- through the proxy ----------------------------------------------------------------------


async def test_json_and_streamed_calls_to_an_http_upstream_go_through_the_proxy(
    environment: pytest.MonkeyPatch, make_pool: MakePool, plain: FakeUpstream, proxy: ForwardProxy
) -> None:
    environment.setenv("HTTP_PROXY", proxy.url)
    pool = make_pool()
    base = http_base(plain)
    assert [await chat(pool, base), await chat(pool, base)] == [ANSWER, ANSWER]
    assert await stream(pool, base) == ANSWER
    assert proxy.lines == [f"POST {base}/v1/chat/completions HTTP/1.1"] * 3
    # The two JSON calls shared one kept-alive connection to the proxy; the stream had its own.
    assert proxy.connections == 2
    assert len(plain.seen) == 3


async def test_json_and_streamed_calls_to_an_https_upstream_tunnel_and_verify_with_ssl_cert_file(
    environment: pytest.MonkeyPatch,
    make_pool: MakePool,
    authority: Authority,
    secure: FakeUpstream,
    proxy: ForwardProxy,
) -> None:
    environment.setenv("HTTPS_PROXY", proxy.url)
    environment.setenv("SSL_CERT_FILE", str(authority.ca_file))
    pool = make_pool()
    base = https_base(secure)
    assert [await chat(pool, base), await chat(pool, base)] == [ANSWER, ANSWER]
    assert await stream(pool, base) == ANSWER
    # One tunnel for both JSON calls (kept alive, TLS inside it), one for the stream.
    assert proxy.lines == [f"CONNECT 127.0.0.1:{secure.port} HTTP/1.1"] * 2
    assert len(secure.seen) == 3


async def test_an_http_proxy_for_https_only_leaves_http_upstreams_direct(
    environment: pytest.MonkeyPatch, make_pool: MakePool, plain: FakeUpstream, proxy: ForwardProxy
) -> None:
    environment.setenv("https_proxy", proxy.url)
    pool = make_pool()
    assert await chat(pool, http_base(plain)) == ANSWER
    assert await stream(pool, http_base(plain)) == ANSWER
    assert proxy.seen == []


@pytest.mark.parametrize(
    ("no_proxy", "bypassed"),
    [
        ("127.0.0.1", True),
        ("example.com, 127.0.0.0/8", True),
        ("*", True),
        ("127.0.0.1:{port}", True),
        ("127.0.0.1:1", False),
        ("localhost", False),  # names are not resolved to match an address
        ("", False),
    ],
)
async def test_no_proxy_sends_matching_hosts_direct_and_others_through_the_proxy(
    environment: pytest.MonkeyPatch,
    make_pool: MakePool,
    authority: Authority,
    plain: FakeUpstream,
    secure: FakeUpstream,
    proxy: ForwardProxy,
    no_proxy: str,
    bypassed: bool,
) -> None:
    environment.setenv("HTTP_PROXY", proxy.url)
    environment.setenv("HTTPS_PROXY", proxy.url)
    environment.setenv("SSL_CERT_FILE", str(authority.ca_file))
    for upstream, base in ((plain, http_base(plain)), (secure, https_base(secure))):
        # An entry with a port matches that upstream's port only.
        environment.setenv("NO_PROXY", no_proxy.format(port=upstream.port))
        pool = make_pool()
        assert await chat(pool, base) == ANSWER
        assert await stream(pool, base) == ANSWER
        assert len(upstream.seen) == 2
    assert (proxy.seen == []) is bypassed
    if not bypassed:
        assert len(proxy.seen) == 4


async def test_proxy_credentials_go_to_the_proxy_on_every_path_and_never_to_the_upstream(
    environment: pytest.MonkeyPatch,
    make_pool: MakePool,
    authority: Authority,
    plain: FakeUpstream,
    secure: FakeUpstream,
) -> None:
    expected = "Basic " + base64.b64encode(b"gw user:p@ss:w0rd").decode()
    proxy = await ForwardProxy(required=expected).start()
    try:
        url = f"http://gw%20user:p%40ss%3Aw0rd@127.0.0.1:{proxy.port}"
        environment.setenv("HTTP_PROXY", url)
        environment.setenv("HTTPS_PROXY", url)
        environment.setenv("SSL_CERT_FILE", str(authority.ca_file))
        pool = make_pool()
        for base in (http_base(plain), https_base(secure)):
            assert await chat(pool, base) == ANSWER
            assert await stream(pool, base) == ANSWER
        assert len(proxy.seen) == 4
        assert all(seen.authorization == expected for seen in proxy.seen)
        for upstream in (plain, secure):
            assert len(upstream.seen) == 2
            assert not any("Proxy-Authorization" in seen.headers for seen in upstream.seen)
    finally:
        await proxy.stop()


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_a_proxy_answering_407_is_a_clear_error_that_never_shows_the_credentials(
    environment: pytest.MonkeyPatch,
    make_pool: MakePool,
    authority: Authority,
    plain: FakeUpstream,
    secure: FakeUpstream,
    scheme: str,
) -> None:
    proxy = await ForwardProxy(required="Basic something-else").start()
    try:
        environment.setenv(
            f"{scheme.upper()}_PROXY", f"http://gw:wrong-secret-42@127.0.0.1:{proxy.port}"
        )
        environment.setenv("SSL_CERT_FILE", str(authority.ca_file))
        pool = make_pool()
        base = http_base(plain) if scheme == "http" else https_base(secure)
        for call in (chat, stream):
            with pytest.raises(UpstreamUnavailable) as refused:
                await call(pool, base)
            assert refused.value.message == (
                f"could not reach upstream model 'm': the proxy http://127.0.0.1:{proxy.port} "
                "answered HTTP 407"
            )
            shown = "".join(traceback.format_exception(refused.value)) + repr(refused.value)
            assert "wrong-secret-42" not in shown
            assert "Z3c6d3Jvbmct" not in shown  # the start of base64("gw:wrong-…")
        assert len(proxy.seen) == 2
        assert plain.seen == [] and secure.seen == []
    finally:
        await proxy.stop()


# ---- the CAs that verify an upstream ------------------------------------------------------


async def test_an_upstream_signed_by_a_ca_the_system_does_not_know_is_refused_on_both_paths(
    make_pool: MakePool, secure: FakeUpstream
) -> None:
    pool = make_pool()
    with pytest.raises(UpstreamUnavailable) as json_refused:
        await chat(pool, https_base(secure))
    assert isinstance(json_refused.value.__cause__, ssl.SSLCertVerificationError)
    with pytest.raises(UpstreamUnavailable, match="ClientConnectorCertificateError"):
        await stream(pool, https_base(secure))
    assert secure.seen == []


def _hashed_folder(authority: Authority, folder: Path) -> Path:
    """A folder in OpenSSL's `c_rehash` layout holding the test CA, as SSL_CERT_DIR wants."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to name a CA in a hashed folder")
    digest = subprocess.run(
        [openssl, "x509", "-hash", "-noout", "-in", str(authority.ca_file)],
        capture_output=True,
        check=True,
        text=True,
    ).stdout.strip()
    folder.mkdir()
    (folder / f"{digest}.0").write_bytes(authority.ca_pem)
    return folder


@pytest.mark.parametrize("variable", ["SSL_CERT_FILE", "SSL_CERT_DIR"])
async def test_an_upstream_signed_by_the_operators_ca_is_trusted_on_both_paths(
    environment: pytest.MonkeyPatch,
    make_pool: MakePool,
    authority: Authority,
    secure: FakeUpstream,
    tmp_path: Path,
    variable: str,
) -> None:
    if variable == "SSL_CERT_FILE":
        environment.setenv(variable, str(authority.ca_file))
    else:
        environment.setenv(variable, str(_hashed_folder(authority, tmp_path / "certs")))
    pool = make_pool()
    assert await chat(pool, https_base(secure)) == ANSWER
    assert await stream(pool, https_base(secure)) == ANSWER


# ---- the gateway's name --------------------------------------------------------------------


async def test_json_and_streamed_calls_say_they_come_from_this_gateway_version(
    make_pool: MakePool, plain: FakeUpstream
) -> None:
    pool = make_pool()
    assert await chat(pool, http_base(plain)) == ANSWER
    assert await stream(pool, http_base(plain)) == ANSWER
    agents = [seen.headers.get("User-Agent") for seen in plain.seen]
    assert agents == [f"llm-gateway/{__version__}"] * 2


async def test_a_user_agent_the_adapter_sets_replaces_the_gateways(
    environment: pytest.MonkeyPatch, make_pool: MakePool, plain: FakeUpstream, proxy: ForwardProxy
) -> None:
    # Through the proxy, which keeps every header line as sent, repeated ones included.
    environment.setenv("HTTP_PROXY", proxy.url)
    pool = make_pool()
    model = model_at(http_base(plain))
    url = http_base(plain) + "/v1/chat/completions"
    own = {"User-Agent": "their-sdk/2.0"}
    await asyncio.wait_for(post_json(pool, model, url, own, {"model": "up-m", **BODY}), GUARD)
    async with open_stream(pool, model, url, own, {"model": "up-m", "stream": True, **BODY}) as r:
        [event async for event in sse_events(r)]
    for seen in proxy.seen:
        assert [v for n, v in seen.headers if n == "user-agent"] == ["their-sdk/2.0"]
    assert len(proxy.seen) == 2
