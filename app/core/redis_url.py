"""REDIS_URL read once for every Redis client of a process, so no two clients can disagree.

redis-py parses the URL (`redis.connection.parse_url`); this module checks what it got and
refuses what some client would not honour: an option only redis-py understands, a TLS option on
a plain connection, a path that is not a database number (redis-py silently ignores it). The
result, `RedisEndpoint`, gives redis-py's pools their keyword arguments and the pipelined client
(`app.core.redis_pipe`) its address, credentials and the TLS context redis-py's asyncio client
builds from the same options.
"""

from __future__ import annotations

import functools
import os
import ssl
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis.asyncio.connection as async_connection
import redis.connection as sync_connection

SUPPORTED_SCHEMES = ("redis://", "rediss://", "unix://")
CERT_REQS = ("none", "optional", "required")
# The `ssl_*` query options, as redis-py's SSL connections name them.
TLS_OPTIONS = (
    "ssl_cert_reqs",
    "ssl_ca_certs",
    "ssl_ca_path",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_password",
    "ssl_check_hostname",
)
OPTIONS = ("db", *TLS_OPTIONS)
_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


class RedisUrlError(ValueError):
    """REDIS_URL cannot be used as written; the message says why, never showing a password."""


@dataclass(frozen=True, slots=True)
class TlsOptions:
    """The `ssl_*` options of a `rediss://` URL, with redis-py's defaults written out."""

    cert_reqs: str = "required"
    ca_certs: str | None = None
    ca_path: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    password: str | None = field(default=None, repr=False)
    check_hostname: bool = True

    def ssl_kwargs(self) -> dict[str, Any]:
        """The options as redis-py's SSL connections take them (`ssl_cert_reqs=…`)."""
        return {f"ssl_{f.name}": getattr(self, f.name) for f in fields(self)}

    def context(self) -> ssl.SSLContext:
        """The context redis-py's asyncio SSL connections build from these options."""
        built: ssl.SSLContext = async_connection.RedisSSLContext(
            keyfile=self.keyfile,
            certfile=self.certfile,
            cert_reqs=self.cert_reqs,
            ca_certs=self.ca_certs,
            ca_path=self.ca_path,
            check_hostname=self.check_hostname,
            password=self.password,
        ).get()
        return built


@dataclass(frozen=True, slots=True)
class RedisEndpoint:
    """Where one Redis is and how to log in: what every client of a process connects with."""

    host: str = "localhost"
    port: int = 6379
    path: str | None = None  # a unix socket, instead of host and port
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: TlsOptions | None = None

    @property
    def address(self) -> str:
        """The server and database, without credentials (for messages and logs)."""
        if self.path is not None:
            return f"unix://{self.path}?db={self.db}"
        return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}/{self.db}"

    def ssl_context(self) -> ssl.SSLContext | None:
        return self.tls.context() if self.tls is not None else None

    def pool_kwargs(self, *, asyncio: bool) -> dict[str, Any]:
        """Keyword arguments of a redis-py connection pool (asyncio or blocking) for here."""
        module: Any = async_connection if asyncio else sync_connection
        kwargs: dict[str, Any] = {
            "db": self.db,
            "username": self.username,
            "password": self.password,
        }
        if self.path is not None:
            kwargs.update(connection_class=module.UnixDomainSocketConnection, path=self.path)
            return kwargs
        kwargs.update(host=self.host, port=self.port)
        if self.tls is None:
            kwargs["connection_class"] = module.Connection
        else:
            kwargs["connection_class"] = module.SSLConnection
            kwargs.update(self.tls.ssl_kwargs())
        return kwargs


@functools.lru_cache(maxsize=16)
def parse_redis_url(url: str) -> RedisEndpoint:
    """The endpoint `url` names, or `RedisUrlError` saying what to change.

    Files named by `ssl_*` options are loaded here, so a missing or unreadable certificate is
    reported at start-up rather than at the first connection.
    """
    if not url.lower().startswith(SUPPORTED_SCHEMES):
        raise RedisUrlError(_scheme_message(url))
    if "#" in url:
        raise RedisUrlError(
            "REDIS_URL contains a '#', which would end the URL there: percent-encode it in the "
            "password (as %23), as any of : / ? # [ ] @ % must be."
        )
    try:
        parts = urlsplit(url)
        parsed: dict[str, Any] = sync_connection.parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        if str(exc).startswith("Invalid value for"):  # redis-py's, naming an option
            raise RedisUrlError(f"REDIS_URL is not a valid Redis URL: {exc}") from None
        # urllib's messages quote the port as it read it, which a password with an unencoded
        # character in it would be part of.
        raise RedisUrlError(
            "REDIS_URL is not a valid Redis URL: its port must be a number from 1 to 65535 "
            "(and a password with any of : / ? # [ ] @ % in it must be percent-encoded)."
        ) from None
    given = parse_qs(parts.query)
    unknown = sorted(set(given) - set(OPTIONS))
    if unknown:
        raise RedisUrlError(
            f"REDIS_URL option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
            f"{'are' if len(unknown) > 1 else 'is'} not supported (every Redis client of the "
            f"gateway must honour the URL alike); the supported ones are {', '.join(OPTIONS)}."
        )
    scheme = parts.scheme.lower()
    tls_given = [name for name in TLS_OPTIONS if name in given]
    if tls_given and scheme != "rediss":
        raise RedisUrlError(
            f"REDIS_URL option {tls_given[0]} applies to TLS connections: use rediss://."
        )
    username, password = parsed.get("username"), parsed.get("password")
    if scheme == "unix":
        if not parsed.get("path"):
            raise RedisUrlError(
                "REDIS_URL unix:// needs the socket's path, as in unix:///run/redis.sock?db=0."
            )
        return RedisEndpoint(
            path=parsed["path"], db=_db(parsed, ""), username=username, password=password
        )
    return RedisEndpoint(
        host=parsed.get("host") or "localhost",
        port=int(parsed.get("port") or 6379),
        db=_db(parsed, parts.path),
        username=username,
        password=password,
        tls=_tls(parsed) if scheme == "rediss" else None,
    )


def _scheme_message(url: str) -> str:
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    shown = f"{scheme}://" if scheme else "a URL without a scheme"
    message = (
        "REDIS_URL must start with redis://, rediss:// (TLS) or unix:// (a socket path), "
        f"not {shown}"
    )
    if "sentinel" in scheme or "cluster" in scheme:
        message += (
            "; Redis Sentinel and Redis Cluster are not supported: give the address of the "
            "primary (or of a proxy in front of the cluster)"
        )
    return message + ". For example rediss://:password@redis.example.com:6380/0."


def _db(parsed: dict[str, Any], path: str) -> int:
    """The database of `?db=` or of the path (redis-py ignores a path that is not a number)."""
    path = path.strip("/")
    if path and not path.isdigit():
        raise RedisUrlError(
            "REDIS_URL's path must be a database number, as in redis://host:6379/0 "
            "(or leave it out for database 0)."
        )
    db = int(parsed.get("db", path or 0))
    if path and int(path) != db:
        raise RedisUrlError(
            f"REDIS_URL names database {int(path)} in its path and {db} in ?db=: keep one."
        )
    if db < 0:
        raise RedisUrlError("REDIS_URL's database number cannot be negative.")
    return db


def _tls(parsed: dict[str, Any]) -> TlsOptions:
    cert_reqs = str(parsed.get("ssl_cert_reqs", "required")).lower()
    if cert_reqs not in CERT_REQS:
        raise RedisUrlError(
            f"REDIS_URL option ssl_cert_reqs must be one of {', '.join(CERT_REQS)}, "
            f"not {parsed['ssl_cert_reqs']!r}."
        )
    for name in _FILES:
        if name in parsed and not os.path.isfile(parsed[name]):
            raise RedisUrlError(f"REDIS_URL option {name}: {parsed[name]} is not a file.")
    if "ssl_ca_path" in parsed and not os.path.isdir(parsed["ssl_ca_path"]):
        raise RedisUrlError(
            f"REDIS_URL option ssl_ca_path: {parsed['ssl_ca_path']} is not a directory."
        )
    check_hostname = parsed.get("ssl_check_hostname")
    tls = TlsOptions(
        cert_reqs=cert_reqs,
        ca_certs=parsed.get("ssl_ca_certs"),
        ca_path=parsed.get("ssl_ca_path"),
        certfile=parsed.get("ssl_certfile"),
        keyfile=parsed.get("ssl_keyfile"),
        password=parsed.get("ssl_password"),
        check_hostname=True if check_hostname is None else check_hostname,
    )
    try:
        tls.context()
    except (ssl.SSLError, OSError) as exc:
        raise RedisUrlError(
            f"REDIS_URL's TLS files cannot be loaded ({exc}): check that ssl_ca_certs holds "
            "PEM certificates, that ssl_certfile and ssl_keyfile are a matching certificate "
            "and key, and ssl_password if the key is encrypted."
        ) from None
    return tls
