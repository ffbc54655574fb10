"""The upstream HTTP clients and the request helpers the adapters share.

A plain JSON call goes through `H1Client` (app/gateway/providers/h1.py), which costs a sixth
of aiohttp's CPU per request; streamed answers go through one pooled aiohttp session per
upstream origin. Both take their proxy from the same `ProxyRules`, read from the environment
when the pool is built, verify TLS the same way (`SSL_CERT_FILE` and `SSL_CERT_DIR` honoured),
and connect only to addresses the same `OutboundPolicy` allows (checked per new connection, so
a provider URL cannot reach loopback, private or metadata addresses unless the operator listed
them in `OUTBOUND_ALLOWED_HOSTS`; through a proxy, the host as it resolves here). Neither
follows redirects: a 3xx is an upstream error.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
from aiohttp.abc import AbstractResolver, ResolveResult

from app.core.egress import USER_AGENT, Proxy, ProxyRefused, ProxyRules, verified_context
from app.core.outbound import ForbiddenDestination, OutboundFailed, OutboundPolicy, connectable
from app.gateway.providers.base import (
    JSON,
    Upstream,
    connection_error,
    forbidden_error,
    redirect_error,
    timeout_error,
    upstream_error,
)
from app.gateway.providers.h1 import H1Client


class GuardedResolver(AbstractResolver):
    """Resolves as the JSON client does: every address of the host checked by the policy.

    aiohttp connects to the addresses resolved here (and caches them), so what was checked is
    what is called. Literal addresses never reach a resolver: `HttpPool.session` checks those.
    """

    def __init__(self, policy: OutboundPolicy) -> None:
        self._policy = policy

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        # Every address is given whatever `family` asks (aiohttp's connector asks for any).
        try:
            addresses = await self._policy.checked_addresses(host, port)
        except OutboundFailed as exc:
            # aiohttp reports an OSError with an errno as a DNS failure of this host.
            raise socket.gaierror(socket.EAI_NONAME, exc.message) from exc
        results: list[ResolveResult] = []
        for address in addresses:
            shown = connectable(address)
            results.append(
                ResolveResult(
                    hostname=host,
                    host=shown,
                    port=port,
                    family=socket.AF_INET6 if ":" in shown else socket.AF_INET,
                    proto=0,
                    flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
                )
            )
        return results

    async def close(self) -> None:
        pass


def checked_through_proxy(policy: OutboundPolicy, host: str, port: int) -> aiohttp.TraceConfig:
    """Checks `host` as the proxy would resolve it, each time aiohttp opens a new connection
    (to the proxy) for it, before any byte is sent; a kept-alive one is not checked again."""

    async def check(*_: object) -> None:
        await policy.check_through_proxy(host, port)

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_start.append(check)
    return trace


class HttpPool:
    """Keeps connection pools per upstream origin, so calls reuse warm connections."""

    def __init__(
        self,
        *,
        max_connections: int = 100,
        keepalive: float = 30.0,
        proxies: ProxyRules | None = None,
        policy: OutboundPolicy | None = None,
    ) -> None:
        """`proxies`: by default the environment's (`HTTPS_PROXY`, `NO_PROXY`…), read now;
        `policy`: the addresses upstream calls may reach (by default public ones only)."""
        self.policy = policy or OutboundPolicy()
        self._max_connections = max_connections
        self._keepalive = keepalive
        self.proxies = ProxyRules.from_environment() if proxies is None else proxies
        self._tls: ssl.SSLContext | None = None
        self._sessions: dict[str, tuple[asyncio.AbstractEventLoop, aiohttp.ClientSession]] = {}
        self._clients: dict[asyncio.AbstractEventLoop, H1Client] = {}

    def client(self) -> H1Client:
        """The JSON-call client of the running event loop (a connection belongs to its loop)."""
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            for old in [old for old in self._clients if old.is_closed()]:
                del self._clients[old]
            client = H1Client(
                max_connections=self._max_connections,
                keepalive=self._keepalive,
                proxies=self.proxies,
                policy=self.policy,
            )
            self._clients[loop] = client
        return client

    def session(self, url: str) -> aiohttp.ClientSession:
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        loop = asyncio.get_running_loop()
        held = self._sessions.get(origin)
        # A session belongs to the loop that made it; another loop (a new test, a worker thread)
        # gets its own.
        if held is not None and held[0] is loop and not held[1].closed:
            return held[1]
        if self._tls is None:
            # Made on the first session, not at import as aiohttp's own: SSL_CERT_FILE counts.
            self._tls = verified_context()
        # Once per origin: a forbidden literal address, a localhost or metadata name, or a host
        # that is no plain name (which aiohttp's URL parser could read as another) is refused.
        host = parts.hostname or ""
        self.policy.check_host(host)
        # Through a proxy (the operator's own choice) the connector resolves only the proxy's
        # name, which the policy must not judge; the origin's name, which the proxy resolves, is
        # checked as it resolves here on each new connection.
        proxied = self.stream_proxy(url) is not None
        traces: list[aiohttp.TraceConfig] = []
        if proxied:
            port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
            traces.append(checked_through_proxy(self.policy, host, port))
        resolver = None if proxied else GuardedResolver(self.policy)
        connector = aiohttp.TCPConnector(
            limit=self._max_connections,
            ttl_dns_cache=300,
            keepalive_timeout=self._keepalive,
            ssl=self._tls,
            resolver=resolver,
        )
        # trust_env stays off: the proxy is the one `self.proxies` chose, as for JSON calls.
        session = aiohttp.ClientSession(
            connector=connector,
            raise_for_status=False,
            headers={"user-agent": USER_AGENT},
            trace_configs=traces,
        )
        self._sessions[origin] = (loop, session)
        return session

    def stream_proxy(self, url: str) -> Proxy | None:
        """The proxy a stream to `url` goes through."""
        if not self.proxies.configured:
            return None
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            return None  # aiohttp refuses the URL itself, as without a proxy
        return self.proxies.select(scheme, parts.hostname or "", port)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        client = self._clients.pop(loop, None)
        if client is not None:
            client.close()
        sessions, self._sessions = self._sessions, {}
        for owner, session in sessions.values():
            if owner is loop:
                await session.close()


async def post_json(
    pool: HttpPool, upstream: Upstream, url: str, headers: dict[str, str], payload: JSON
) -> JSON:
    """POST `payload` and return the JSON answer; errors become domain errors."""
    try:
        response = await pool.client().post(
            url,
            {"content-type": "application/json", **headers},
            orjson.dumps(payload),
            total=upstream.timeout,
            connect_timeout=upstream.connect_timeout,
        )
    except TimeoutError as exc:
        raise timeout_error(upstream) from exc
    except ForbiddenDestination as exc:
        raise forbidden_error(upstream, exc) from exc
    except (OSError, ValueError) as exc:  # ConnectionError is an OSError
        raise connection_error(upstream, exc) from exc
    if 300 <= response.status < 400:
        raise redirect_error(upstream, response.status)
    if response.status >= 400:
        raise upstream_error(
            upstream, response.status, response.body, response.headers.get("retry-after")
        )
    try:
        body: Any = orjson.loads(response.body)
    except orjson.JSONDecodeError as exc:
        raise upstream_error(upstream, 502, b"") from exc
    if not isinstance(body, dict):
        raise upstream_error(upstream, 502, b"")
    return body


@asynccontextmanager
async def open_stream(
    pool: HttpPool, upstream: Upstream, url: str, headers: dict[str, str], payload: JSON
) -> AsyncIterator[aiohttp.ClientResponse]:
    """POST `payload` for a streamed answer; leaving the block (or a cancel) closes it."""
    # No total limit on a stream: the gap between two chunks is what must stay short.
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=upstream.connect_timeout, sock_read=upstream.timeout
    )
    proxy = pool.stream_proxy(url)
    options: dict[str, Any] = {}
    if proxy is not None:
        options["proxy"] = proxy.url
        if url[:6].lower() == "https:":
            options["proxy_headers"] = proxy.headers  # on the CONNECT
        else:
            headers = {**headers, **proxy.headers}  # the request itself goes to the proxy
    try:
        async with pool.session(url).post(
            url,
            data=orjson.dumps(payload),
            headers=headers,
            timeout=timeout,
            # A redirect could lead to an address the policy refuses, with the secret along.
            allow_redirects=False,
            **options,
        ) as response:
            if 300 <= response.status < 400:
                raise redirect_error(upstream, response.status)
            if response.status >= 400:
                raw = await response.read()
                if response.status == 407 and proxy is not None:
                    refused = ProxyRefused(proxy, 407)
                    raise connection_error(upstream, refused) from refused
                raise upstream_error(
                    upstream, response.status, raw, response.headers.get("retry-after")
                )
            yield response
    except TimeoutError as exc:
        raise timeout_error(upstream) from exc
    except ForbiddenDestination as exc:
        raise forbidden_error(upstream, exc) from exc
    except aiohttp.ClientHttpProxyError as exc:
        # Raised from the proxy's error, not aiohttp's: that one holds the request's headers.
        assert proxy is not None
        refused = ProxyRefused(proxy, exc.status)
        raise connection_error(upstream, refused) from refused
    except aiohttp.ClientError as exc:
        raise connection_error(upstream, exc) from exc


async def sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[str | None, bytes]]:
    """`(event, data)` pairs of a server-sent event stream."""
    event: str | None = None
    data: list[bytes] = []
    async for raw_line in response.content:
        line = raw_line.rstrip(b"\r\n")
        if not line:
            if data:
                yield event, b"\n".join(data)
            event, data = None, []
        elif line.startswith(b"data:"):
            data.append(line[5:].lstrip(b" "))
        elif line.startswith(b"event:"):
            event = line[6:].strip().decode()
    if data:
        yield event, b"\n".join(data)
