"""How the gateway's own calls leave the process: their User-Agent, the CAs that verify TLS,
and the proxy rules of the environment, read as curl and httpx read them.

Proxies come from `HTTP_PROXY`, `HTTPS_PROXY` and `ALL_PROXY` (lower-case names win, as in
`urllib.request.getproxies()`), and `NO_PROXY` exempts hosts: `*` for all, a name for itself and
its subdomains (a leading `.` or `*.` changes nothing), an address or CIDR range for literal
addresses (names are never resolved to match one), each optionally with `:port`. Loopback is not
exempt unless listed, as with curl and httpx. Only `http://` proxies are spoken to.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import ssl
import urllib.request
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from app import __version__

USER_AGENT = f"llm-gateway/{__version__}"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def verified_context() -> ssl.SSLContext:
    """A client TLS context that verifies certificates and host names.

    `ssl.create_default_context()` loads OpenSSL's default paths, and those are `SSL_CERT_FILE`
    and `SSL_CERT_DIR` when set (replacing the system's bundle, as with curl), so an operator's
    corporate CA is trusted by setting them. It takes about 20 ms: build one and share it.
    """
    return ssl.create_default_context()


class ProxyRefused(ConnectionError):
    """The proxy answered with an error status instead of forwarding the request."""

    def __init__(self, proxy: Proxy, status: int) -> None:
        super().__init__(f"the proxy {proxy} answered HTTP {status}")
        self.status = status


@dataclass(frozen=True, slots=True)
class Proxy:
    """An HTTP proxy; `str()` shows where it is, never its credentials."""

    host: str
    port: int
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str, variable: str) -> Proxy:
        """From `http://user:password@host:port` (`host:port` alone means http)."""
        parts = urlsplit(url if "://" in url else f"http://{url}")
        shown = f"{parts.scheme}://{parts.hostname or ''}"
        if parts.scheme.lower() != "http":
            raise ValueError(
                f"{variable} is {shown}…: only http:// proxies are supported (the proxy "
                "tunnels https with CONNECT); set an http:// proxy URL or unset it."
            )
        try:
            port = parts.port or 80
        except ValueError:
            port = 0
        if not parts.hostname or not port:
            raise ValueError(f"{variable} must be a URL such as http://proxy.example:3128.")
        username = unquote(parts.username) if parts.username is not None else None
        if username is not None and ":" in username:
            raise ValueError(f"{variable}: a proxy user name cannot contain ':'.")
        password = unquote(parts.password) if parts.password is not None else None
        return cls(parts.hostname, port, username, password)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def authorization(self) -> str | None:
        """The `Proxy-Authorization` value (Basic, UTF-8), or None without credentials."""
        if self.username is None:
            return None
        token = f"{self.username}:{self.password or ''}".encode()
        return "Basic " + base64.b64encode(token).decode("ascii")

    @property
    def headers(self) -> dict[str, str]:
        """What a request to the proxy itself carries (its credentials, if any)."""
        authorization = self.authorization
        return {} if authorization is None else {"proxy-authorization": authorization}

    def __str__(self) -> str:
        return self.url


@dataclass(frozen=True, slots=True)
class _Exemption:
    domain: str | None  # lower-case, without leading or trailing dots
    network: IPNetwork | None
    port: int | None


class NoProxy:
    """The hosts `NO_PROXY` exempts from the proxy."""

    def __init__(self, value: str = "") -> None:
        self.everything = False
        self._entries: list[_Exemption] = []
        for raw in re.split(r"[\s,]+", value.strip().lower()):
            if raw == "*":
                self.everything = True
            elif raw:
                self._entries.append(_exemption(raw))

    def matches(self, host: str, port: int) -> bool:
        if self.everything:
            return True
        host = host.lower().strip("[]").rstrip(".")
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            address = None
        for entry in self._entries:
            if entry.port is not None and entry.port != port:
                continue
            if address is not None:
                if entry.network is not None and _within(address, entry.network):
                    return True
            elif entry.domain is not None and (
                host == entry.domain or host.endswith("." + entry.domain)
            ):
                return True
        return False


def _within(address: ipaddress.IPv4Address | ipaddress.IPv6Address, network: IPNetwork) -> bool:
    return address.version == network.version and address in network


def _exemption(entry: str) -> _Exemption:
    host, port = entry, None
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
    elif entry.count(":") == 1:
        name, _, number = entry.partition(":")
        if number.isdigit():
            host, port = name, int(number)
    try:
        return _Exemption(None, ipaddress.ip_network(host, strict=False), port)
    except ValueError:
        return _Exemption(host.lstrip("*").strip("."), None, port)


class ProxyRules:
    """Which proxy, if any, a call to an origin goes through; decided once per origin."""

    def __init__(
        self, *, http: Proxy | None = None, https: Proxy | None = None, no_proxy: str = ""
    ) -> None:
        self.http = http
        self.https = https
        self.no_proxy = NoProxy(no_proxy)
        self._decided: dict[tuple[str, str, int], Proxy | None] = {}

    @classmethod
    def from_environment(cls) -> ProxyRules:
        """The rules of this process's environment; `ValueError` names a proxy it cannot use."""
        found = urllib.request.getproxies_environment()
        proxies: dict[str, Proxy | None] = {}
        for scheme in ("http", "https"):
            key = scheme if found.get(scheme) else "all"
            url = found.get(key)
            proxies[scheme] = Proxy.parse(url, f"{key.upper()}_PROXY") if url else None
        return cls(http=proxies["http"], https=proxies["https"], no_proxy=found.get("no", ""))

    @property
    def configured(self) -> bool:
        return self.http is not None or self.https is not None

    def select(self, scheme: str, host: str, port: int) -> Proxy | None:
        """The proxy for `scheme://host:port` (`host` as `urlsplit().hostname` gives it)."""
        if self.http is None and self.https is None:
            return None
        key = (scheme, host, port)
        if key in self._decided:
            return self._decided[key]
        proxy = self.https if scheme == "https" else self.http
        if proxy is not None and self.no_proxy.matches(host, port):
            proxy = None
        if len(self._decided) > 1000:
            self._decided.clear()
        self._decided[key] = proxy
        return proxy


DIRECT = ProxyRules()
