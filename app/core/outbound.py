"""The one HTTP client for user-configured URLs, guarded against server-side request forgery.

Every connection, redirect hops included, goes through `GuardedBackend.connect_tcp`: it resolves
the host, refuses any address that is not publicly routable (unless an operator allowed it), and
connects to the very address it checked, so a second DNS answer cannot point elsewhere.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

from app.core.egress import USER_AGENT, verified_context
from app.core.errors import InvalidInput, Transient

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[list[str]]]

DEFAULT_MAX_RESPONSE_BYTES = 1024 * 1024
DEFAULT_TIMEOUT = 15.0
MAX_REDIRECTS = 5

# Hosts that answer with cloud credentials; they resolve to refused addresses anyway, but a
# resolver on such a host may answer otherwise, so they are refused by name too.
METADATA_HOSTS = frozenset(
    {"metadata", "metadata.google.internal", "metadata.goog", "instance-data", "instance-data.ec2"}
)
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254")
)
NAT64 = ipaddress.ip_network("64:ff9b::/96")
# `localhost` and every name under it mean loopback (RFC 6761), whatever a resolver answers.
LOOPBACK_ADDRESSES: tuple[IPAddress, ...] = (
    ipaddress.IPv4Address("127.0.0.1"),
    ipaddress.IPv6Address("::1"),
)
# A host name as every parser and resolver reads it alike: ASCII labels of letters, digits,
# `-` and `_`, no label starting or ending with `-`, an optional final dot. Anything else
# (percent-encoding, spaces, look-alike Unicode digits and dots) is read differently by some.
HOST_NAME = re.compile(
    r"(?=.{1,254}\Z)(?!-)[a-z0-9_-]{1,63}(?<!-)(?:\.(?!-)[a-z0-9_-]{1,63}(?<!-))*\.?",
    re.IGNORECASE | re.ASCII,
)


class ForbiddenDestination(InvalidInput):
    """A URL whose host is, or resolves to, an address the gateway must not call."""

    code = "forbidden_destination"


class OutboundFailed(Transient):
    """The remote end could not be reached in time, or broke the connection."""

    code = "outbound_failed"


def parse_host_address(host: str) -> IPAddress | None:
    """The address `host` spells, in any form a C resolver accepts, or None for a name.

    Accepts dotted IPv4 with one to four parts, each decimal, octal (leading 0) or hex (0x),
    as `inet_aton` does, and IPv6 with or without brackets or a zone.
    """
    candidate = host.strip().rstrip(".").strip("[]")
    if not candidate:
        return None
    if ":" in candidate:
        try:
            return ipaddress.IPv6Address(candidate.split("%", 1)[0])
        except ValueError:
            return None
    parts = candidate.split(".")
    if len(parts) > 4:
        return None
    numbers: list[int] = []
    for part in parts:
        try:
            if part.lower().startswith("0x"):
                numbers.append(int(part[2:] or "0", 16))
            elif len(part) > 1 and part.startswith("0"):
                numbers.append(int(part, 8))
            else:
                if not part.isdigit():
                    return None
                numbers.append(int(part, 10))
        except ValueError:
            return None
    # The last part fills every byte the earlier parts left (127.1 is 127.0.0.1).
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 256 ** (4 - len(head)):
        return None
    value = 0
    for n in head:
        value = value << 8 | n
    value = value << 8 * (4 - len(head)) | last
    return ipaddress.IPv4Address(value)


def is_localhost(host: str) -> bool:
    """Whether `host` is `localhost` or a name under it, in any case, with or without the dot."""
    name = host.lower().rstrip(".")
    return name == "localhost" or name.endswith(".localhost")


def forbidden_reason(address: IPAddress) -> str | None:
    """Why the gateway refuses to call `address`, or None if it is publicly routable."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address.teredo is not None:
            embedded = address.teredo[1]
        if embedded is None and address in NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return forbidden_reason(embedded)
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if isinstance(address, ipaddress.IPv6Address) and address in ipaddress.ip_network("fc00::/7"):
        return "a unique-local address"
    if address.is_private:
        return "a private address"
    if address.is_reserved or not address.is_global:
        return "a reserved address"
    return None


@dataclass(frozen=True)
class OutboundPolicy:
    """What an operator allows beyond public addresses: host names and address ranges."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, entries: str | Iterable[str]) -> OutboundPolicy:
        """From `localhost,10.0.0.0/8,192.168.1.7` (names, addresses or CIDR ranges).

        A name matches only itself (no wildcard, no subdomain); an address is read in every
        spelling a resolver accepts. Raises `ValueError` naming an entry that is none of these,
        such as `host:port`, a URL or `*.example`, so a mistyped setting fails at startup.
        """
        items = entries.split(",") if isinstance(entries, str) else list(entries)
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for raw in items:
            entry = raw.strip().lower()
            if not entry:
                continue
            address = parse_host_address(entry)
            if address is not None:
                networks.append(ipaddress.ip_network(address))
            elif HOST_NAME.fullmatch(entry):
                hosts.add(entry.rstrip("."))
            else:
                networks.append(_network(raw.strip()))
        return cls(frozenset(hosts), tuple(networks))

    def allows_host(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.hosts

    def allows_address(self, address: IPAddress) -> bool:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # what a socket connects to
        return any(address.version == n.version and address in n for n in self.networks)

    def check_address(self, host: str, address: IPAddress, *, param: str = "url") -> None:
        """Raise `ForbiddenDestination` unless `address` (of `host`) may be called."""
        if self.allows_host(host) or self.allows_address(address):
            return
        reason = forbidden_reason(address)
        if reason is not None:
            shown = host if host.strip("[]") == str(address) else f"{host} ({address})"
            raise ForbiddenDestination(f"refusing to call {shown}: {reason}", param=param)

    def check_host(self, host: str, *, param: str = "url") -> IPAddress | None:
        """Refuse a forbidden literal address, a name that is no plain host name, a cloud
        metadata host or a localhost name; the address, if `host` spells one (a name is
        checked with its addresses when a connection opens)."""
        address = parse_host_address(host)
        if address is not None:
            self.check_address(host, address, param=param)
            return address
        if not HOST_NAME.fullmatch(host):
            raise ForbiddenDestination(
                f"refusing to call {host!r}: not a host name (ASCII letters, digits, '-' and "
                "dots; an international name in its xn-- form)",
                param=param,
            )
        if self.allows_host(host):
            return None
        if host.lower().rstrip(".") in METADATA_HOSTS:
            raise ForbiddenDestination(
                f"refusing to call {host}: a cloud metadata host", param=param
            )
        if is_localhost(host) and not any(self.allows_address(a) for a in LOOPBACK_ADDRESSES):
            raise ForbiddenDestination(f"refusing to call {host}: a loopback name", param=param)
        return None

    def check_url(self, url: str, *, param: str = "url") -> httpx.URL:
        """A parsed http(s) URL, refused early when its host is a forbidden literal address,
        a localhost or metadata name, or no plain host name, or its port does not exist.

        Host names are checked again, with their addresses, when a connection is opened.
        The host is checked as httpx and as `urlsplit` (the provider clients' parser) read it,
        so a URL they read differently cannot pass as one and be called as the other.
        `param` names the field the URL came from in the error.
        """
        try:
            parsed = httpx.URL(url)
            split = urlsplit(url)
            hosts = {parsed.raw_host.decode("ascii"), split.hostname or ""}
            if split.port == 0:
                raise ValueError("port 0")  # `split.port` itself refuses one past 65535
        except (httpx.InvalidURL, ValueError) as exc:
            raise InvalidInput(f"'{url}' is not a valid URL", param=param) from exc
        if parsed.scheme not in ("http", "https") or not parsed.raw_host:
            raise InvalidInput("the URL must start with http:// or https://", param=param)
        if parsed.userinfo:
            raise InvalidInput("the URL must not carry a user name or password", param=param)
        for host in sorted(hosts):
            self.check_host(host, param=param)
        return parsed

    async def checked_addresses(
        self, host: str, port: int, resolver: Resolver | None = None
    ) -> list[IPAddress]:
        """The addresses of `host`, all of them allowed, or `ForbiddenDestination`.

        Connect to one of these, never to `host` again: a second DNS answer could differ.
        """
        literal = self.check_host(host)
        if literal is not None:
            return [literal]
        try:
            answers = await (resolver or system_resolver)(host, port)
        except OSError as exc:
            raise OutboundFailed(f"could not resolve {host}") from exc
        found = [parse_host_address(a) or ipaddress.ip_address(a) for a in answers]
        if not found:
            raise OutboundFailed(f"could not resolve {host}")
        # Every answer is checked: one private address among public ones is refused too.
        for address in found:
            self.check_address(host, address)
        return found

    async def check_through_proxy(self, host: str, port: int) -> None:
        """Refuse `host` when it resolves here to an address the policy forbids.

        Through a proxy the proxy resolves the name, out of our sight, and connects: this lookup
        is the best view of where it will go. A name that does not resolve here (only the
        proxy's DNS may know it) is left to the proxy, and so is an answer that changes between
        the two lookups: keeping such a name from internal addresses is the proxy's own rules'
        task.
        """
        try:
            await self.checked_addresses(host, port)
        except OutboundFailed:
            return


def _network(entry: str) -> IPNetwork:
    """A CIDR range such as `10.0.0.0/8` or `[fd00::]/8`, or `ValueError` naming `entry`."""
    try:
        return ipaddress.ip_network(entry.lower().replace("[", "").replace("]", ""), strict=False)
    except ValueError:
        raise ValueError(
            f"'{entry}' is not a host name, an address or a CIDR range (write no scheme, port "
            "or wildcard)"
        ) from None


def connectable(address: IPAddress) -> str:
    """`address` as a socket connects to it (an IPv4-mapped IPv6 address as plain IPv4)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


async def system_resolver(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for `host` (without blocking the loop)."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """Opens TCP connections only to checked addresses, and to exactly those addresses."""

    def __init__(self, policy: OutboundPolicy, resolver: Resolver) -> None:
        self._policy = policy
        self._resolver = resolver
        self._inner = httpcore.AnyIOBackend()

    async def checked_addresses(self, host: str, port: int) -> list[IPAddress]:
        """The addresses of `host`, all of them allowed, or `ForbiddenDestination`."""
        return await self._policy.checked_addresses(host, port, self._resolver)

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await self.checked_addresses(host, port)
        last: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    connectable(address),
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise ForbiddenDestination("refusing to call a unix socket", param="url")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _GuardedTransport(httpx.AsyncHTTPTransport):
    def __init__(self, backend: GuardedBackend, limits: httpx.Limits) -> None:
        # No proxy from the environment: the guard checks the address it connects to, and
        # through a proxy that would be the proxy's, never the destination's.
        super().__init__(trust_env=False, limits=limits)
        # httpx takes no network backend, so its pool is rebuilt with ours (same settings).
        self._pool = httpcore.AsyncConnectionPool(
            # The CAs upstream calls trust (system or SSL_CERT_FILE), not httpx's certifi bundle.
            ssl_context=verified_context(),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=backend,
        )


@dataclass(frozen=True)
class OutboundResponse:
    """What came back: status, headers, at most the bounded number of body bytes."""

    status_code: int
    headers: Mapping[str, str]
    body: bytes
    truncated: bool
    elapsed_ms: float
    url: str

    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


class OutboundClient:
    """HTTP requests to user-configured URLs: guarded, bounded in size and in total time."""

    def __init__(
        self,
        policy: OutboundPolicy | None = None,
        *,
        resolver: Resolver | None = None,
        max_connections: int = 100,
        user_agent: str = USER_AGENT,
    ) -> None:
        self.policy = policy or OutboundPolicy()
        self._backend = GuardedBackend(self.policy, resolver or system_resolver)
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=20)
        self._client = httpx.AsyncClient(
            transport=_GuardedTransport(self._backend, limits),
            trust_env=False,
            follow_redirects=False,
            # Raw bytes only: a small compressed body must not expand past the size bound.
            headers={"user-agent": user_agent, "accept-encoding": "identity"},
        )

    async def request(
        self,
        method: str,
        url: str,
        *,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109
        follow_redirects: bool = False,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        truncate: bool = False,
    ) -> OutboundResponse:
        """Send one request (following at most 5 checked redirects when asked).

        Raises `ForbiddenDestination` for a refused host on any hop, `OutboundFailed` for
        timeouts and connection failures (`timeout` bounds the whole exchange), and
        `OutboundFailed` for a body over `max_response_bytes` unless `truncate` keeps its start.
        """
        target = self.policy.check_url(url)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                for _ in range(MAX_REDIRECTS + 1):
                    response = await self._send(
                        method, target, content, headers, timeout, max_response_bytes, truncate
                    )
                    location = response.headers.get("location")
                    if not (follow_redirects and response.status_code in REDIRECTS and location):
                        break
                    target = self.policy.check_url(str(target.join(location)))
                    if response.status_code in (301, 302, 303) and method != "HEAD":
                        method, content = "GET", None
                else:
                    raise OutboundFailed(f"more than {MAX_REDIRECTS} redirects from {url}")
        except TimeoutError as exc:
            raise OutboundFailed(f"no complete answer within {timeout:g} s") from exc
        except httpx.TimeoutException as exc:
            raise OutboundFailed(f"no complete answer within {timeout:g} s") from exc
        except httpx.HTTPError as exc:
            raise OutboundFailed(f"connection failed ({type(exc).__name__})") from exc
        return OutboundResponse(
            status_code=response.status_code,
            headers=response.headers,
            body=response.body,
            truncated=response.truncated,
            elapsed_ms=(time.perf_counter() - started) * 1000,
            url=str(target),
        )

    async def _send(
        self,
        method: str,
        url: httpx.URL,
        content: bytes | None,
        headers: Mapping[str, str] | None,
        timeout: float,  # noqa: ASYNC109
        limit: int,
        truncate: bool,
    ) -> OutboundResponse:
        request = self._client.build_request(
            method, url, content=content, headers=headers, timeout=timeout
        )
        response = await self._client.send(request, stream=True)
        try:
            body = bytearray()
            truncated = False
            async for chunk in response.aiter_raw():
                body.extend(chunk)
                if len(body) > limit:
                    if not truncate:
                        raise OutboundFailed(f"the response is larger than {limit} bytes")
                    del body[limit:]
                    truncated = True
                    break
        finally:
            await response.aclose()
        return OutboundResponse(
            status_code=response.status_code,
            headers=dict(response.headers),
            body=bytes(body),
            truncated=truncated,
            elapsed_ms=0.0,
            url=str(url),
        )

    async def aclose(self) -> None:
        await self._client.aclose()


REDIRECTS = frozenset({301, 302, 303, 307, 308})
