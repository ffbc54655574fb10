"""DATABASE_URL, checked once and handed to both drivers in the form each takes: asyncpg for the
pool, libpq (psycopg) for migrations.

The two read a URL differently: asyncpg sends every query option it does not know to the
server as a setting (so `connect_timeout` fails at the first connection and `options` is not
checked), decodes `+` as a space, and ends the credentials at a `?` or `#` where libpq does
not. So the URL is parsed here the way libpq parses it, options outside the set both drivers
can honour are refused with a sentence, and each driver gets a URL rebuilt with every part
percent-encoded, plus, for asyncpg, keyword arguments for what it would not honour itself.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

SCHEMES = ("postgresql+psycopg://", "postgresql+asyncpg://", "postgresql://", "postgres://")

SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
SESSION_ATTRS = ("any", "primary", "standby", "prefer-standby", "read-write", "read-only")

# Options both drivers read from the URL themselves: passed on as they are (values checked).
_PASSED = (
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslpassword",
    "sslcrl",
    "target_session_attrs",
    "host",
    "port",
    "dbname",
    "user",
    "password",
    "passfile",
)
# Options asyncpg gets as keyword arguments instead (`server_settings`, `timeout`).
_TRANSLATED = ("application_name", "options", "connect_timeout")
OPTIONS = _PASSED + _TRANSLATED

_FILES = ("sslrootcert", "sslcert", "sslkey", "sslcrl", "passfile")
_SECRETS = ("password", "sslpassword")
# The pool sets these on every session itself; a URL saying otherwise would be overruled.
_FIXED_SETTINGS = {"timezone": "the gateway's sessions run in UTC"}
_SETTING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


class InvalidDatabaseUrl(ValueError):
    """DATABASE_URL cannot be used as it is; the message says why, without its password."""


@dataclass(frozen=True)
class DatabaseUrl:
    """One database URL, checked, in the forms its users need."""

    libpq: str  # for psycopg (Alembic, `gateway migrate`): every option, percent-encoded
    asyncpg: str  # for asyncpg: the options it honours from a URL
    server_settings: dict[str, str]  # for asyncpg: application_name and those of `options`
    connect_timeout: float | None
    database: str  # as named in the URL ("" when it leaves the name to the driver)
    redacted: str  # for messages: the URL with its secrets hidden


def parse_database_url(url: str) -> DatabaseUrl:
    """Check `url` and build both drivers' forms of it; `InvalidDatabaseUrl` says what is wrong."""
    rest = next((url[len(s) :] for s in SCHEMES if url.startswith(s)), None)
    if rest is None:
        raise InvalidDatabaseUrl(
            "must be a PostgreSQL URL such as postgresql://user:password@host:5432/dbname"
        )
    # As libpq reads it: the credentials end at the first '@' before any '/'.
    credentials = ""
    at, slash = rest.find("@"), rest.find("/")
    if at >= 0 and (slash < 0 or at < slash):
        credentials, rest = rest[:at], rest[at + 1 :]
    rest, _, query = rest.partition("?")
    hosts, _, path = rest.partition("/")
    _check_hosts(hosts)
    user, colon, password = credentials.partition(":")
    user, password = unquote(user), unquote(password)
    options = _parse_query(query)
    # The drivers disagree on which of the two wins, so a URL may name each only once.
    for key, given in (
        ("user", user),
        ("password", colon),
        ("host", hosts),
        ("port", ":" in hosts.rpartition("]")[2]),
        ("dbname", path),
    ):
        if given and key in options:
            raise InvalidDatabaseUrl(f"sets the {key} both in the address and as ?{key}=")
    database = options.pop("dbname", None) or unquote(path)

    passed = {k: v for k, v in options.items() if k in _PASSED}
    _check_passed(passed)
    server_settings: dict[str, str] = {}
    if "application_name" in options:
        server_settings["application_name"] = options["application_name"]
    if "options" in options:
        server_settings.update(_server_options(options["options"]))
    timeout = _timeout(options["connect_timeout"]) if "connect_timeout" in options else None

    authority = _q(user) + (":" + _q(password) if colon else "") + ("@" if credentials else "")
    base = f"postgresql://{authority}{hosts}/{_q(database)}"
    shown = _q(user) + (":***" if colon else "") + ("@" if credentials else "")
    redacted_options = {k: "***" if k in _SECRETS else v for k, v in options.items()}
    return DatabaseUrl(
        libpq=base + _query(options),
        asyncpg=base + _query(passed),
        server_settings=server_settings,
        connect_timeout=timeout,
        database=database,
        redacted=f"postgresql://{shown}{hosts}/{_q(database)}" + _query(redacted_options),
    )


def _q(text: str) -> str:
    return quote(text, safe="")


def _query(options: dict[str, str]) -> str:
    return "?" + "&".join(f"{k}={_q(v)}" for k, v in options.items()) if options else ""


def _check_hosts(hosts: str) -> None:
    """Each `host[:port]` of a comma-separated list: a port, when given, is a number."""
    for spec in hosts.split(","):
        port = spec.rpartition("]")[2] if spec.startswith("[") else spec
        _, colon, number = port.rpartition(":") if ":" in port else ("", "", "")
        if colon and not (number.isdigit() and 0 < int(number) < 65536):
            raise InvalidDatabaseUrl(f"the port of host {unquote(spec)!r} is not a port number")


def _parse_query(query: str) -> dict[str, str]:
    options: dict[str, str] = {}
    for part in query.split("&"):
        if not part:
            continue
        raw_key, equals, value = part.partition("=")
        key = unquote(raw_key)
        if not equals:
            raise InvalidDatabaseUrl(
                "has a query part without '=' (options are name=value, joined by '&'; "
                "percent-encode a '?', '&' or '/' in the password)"
            )
        if key not in OPTIONS:
            shown = repr(key) if _SETTING_NAME.fullmatch(key) else "a query part"
            raise InvalidDatabaseUrl(
                f"{shown} is not an option the gateway knows; it takes "
                f"{', '.join(OPTIONS)}. A server setting goes in options, e.g. "
                "options=-c%20statement_timeout%3D5000"
            )
        if key in options:
            raise InvalidDatabaseUrl(f"sets the option {key!r} twice")
        options[key] = unquote(value)
    return options


def _check_passed(options: dict[str, str]) -> None:
    mode = options.get("sslmode")
    if mode is not None and mode not in SSL_MODES:
        raise InvalidDatabaseUrl(f"sslmode must be one of {', '.join(SSL_MODES)}, not {mode!r}")
    attrs = options.get("target_session_attrs")
    if attrs is not None and attrs not in SESSION_ATTRS:
        raise InvalidDatabaseUrl(
            f"target_session_attrs must be one of {', '.join(SESSION_ATTRS)}, not {attrs!r}"
        )
    port = options.get("port")
    if port is not None and not all(p.isdigit() for p in port.split(",")):
        raise InvalidDatabaseUrl("port must be a port number (or a comma-separated list of them)")
    for name in _FILES:
        path = options.get(name)
        if path is not None and not os.access(Path(path).expanduser(), os.R_OK):
            raise InvalidDatabaseUrl(f"{name}: cannot read the file {path!r}")
    if mode in ("verify-ca", "verify-full") and "sslrootcert" not in options:
        default = Path("~/.postgresql/root.crt").expanduser()
        if not os.environ.get("PGSSLROOTCERT") and not default.is_file():
            raise InvalidDatabaseUrl(
                f"sslmode={mode} checks the server's certificate against a certificate "
                "authority: set sslrootcert=/path/to/ca.pem in the URL (or put the CA at "
                "~/.postgresql/root.crt)"
            )


def _server_options(options: str) -> dict[str, str]:
    """The settings of a libpq `options` string: `-c name=value` (or `-cname=value`,
    `--name=value`), separated by spaces."""
    settings: dict[str, str] = {}
    words = iter(_words(options))
    for word in words:
        setting = ""
        if word == "-c":
            setting = next(words, "")
        elif word.startswith(("-c", "--")):
            setting = word[2:]
        name, equals, value = setting.partition("=")
        name = name.replace("-", "_")
        if not equals or not _SETTING_NAME.fullmatch(name):
            raise InvalidDatabaseUrl(
                "options must be server settings written -c name=value, separated by spaces "
                "(percent-encoded: options=-c%20statement_timeout%3D5000)"
            )
        if name.lower() in _FIXED_SETTINGS:
            raise InvalidDatabaseUrl(f"options cannot set {name}: {_FIXED_SETTINGS[name.lower()]}")
        settings[name] = value
    return settings


def _words(text: str) -> list[str]:
    """`text` split at spaces, a backslash keeping the next character (a space) in the word, as
    the server splits `options`."""
    words: list[str] = []
    word: str | None = None  # None between words
    escaped = False
    for char in text:
        if escaped or (char != "\\" and not char.isspace()):
            word, escaped = (word or "") + char, False
        elif char == "\\":
            word, escaped = word or "", True
        elif word is not None:
            words.append(word)
            word = None
    if word is not None:
        words.append(word)
    return words


def _timeout(value: str) -> float:
    if not value.isdigit() or int(value) < 1:
        raise InvalidDatabaseUrl(
            f"connect_timeout must be a whole number of seconds, at least 1, not {value!r}"
        )
    return float(value)
