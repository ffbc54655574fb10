"""One pooled aiohttp session per upstream origin, and the request helpers the adapters share."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from app.gateway.providers.base import (
    JSON,
    Upstream,
    connection_error,
    timeout_error,
    upstream_error,
)


class HttpPool:
    """Keeps one connection pool per upstream origin, so calls reuse warm connections."""

    def __init__(self, *, max_connections: int = 100) -> None:
        self._max_connections = max_connections
        self._sessions: dict[str, tuple[asyncio.AbstractEventLoop, aiohttp.ClientSession]] = {}

    def session(self, url: str) -> aiohttp.ClientSession:
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        loop = asyncio.get_running_loop()
        held = self._sessions.get(origin)
        # A session belongs to the loop that made it; another loop (a new test, a worker thread)
        # gets its own.
        if held is not None and held[0] is loop and not held[1].closed:
            return held[1]
        connector = aiohttp.TCPConnector(
            limit=self._max_connections, ttl_dns_cache=300, keepalive_timeout=30
        )
        session = aiohttp.ClientSession(connector=connector, raise_for_status=False)
        self._sessions[origin] = (loop, session)
        return session

    async def close(self) -> None:
        sessions, self._sessions = self._sessions, {}
        loop = asyncio.get_running_loop()
        for owner, session in sessions.values():
            if owner is loop:
                await session.close()


async def post_json(
    pool: HttpPool, upstream: Upstream, url: str, headers: dict[str, str], payload: JSON
) -> JSON:
    """POST `payload` and return the JSON answer; errors become domain errors."""
    timeout = aiohttp.ClientTimeout(total=upstream.timeout, sock_connect=upstream.connect_timeout)
    try:
        async with pool.session(url).post(
            url, data=orjson.dumps(payload), headers=headers, timeout=timeout
        ) as response:
            raw = await response.read()
            if response.status >= 400:
                raise upstream_error(
                    upstream, response.status, raw, response.headers.get("retry-after")
                )
    except TimeoutError as exc:
        raise timeout_error(upstream) from exc
    except aiohttp.ClientError as exc:
        raise connection_error(upstream, exc) from exc
    try:
        body: Any = orjson.loads(raw)
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
    try:
        async with pool.session(url).post(
            url, data=orjson.dumps(payload), headers=headers, timeout=timeout
        ) as response:
            if response.status >= 400:
                raw = await response.read()
                raise upstream_error(
                    upstream, response.status, raw, response.headers.get("retry-after")
                )
            yield response
    except TimeoutError as exc:
        raise timeout_error(upstream) from exc
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
