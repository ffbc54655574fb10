"""Identifier generation and validation rules shared by the domains."""

from __future__ import annotations

import os
import re

from app.core.errors import InvalidId

SLUG_MAX = 50
_SLUG = re.compile(r"^[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,48}[a-zA-Z0-9])?$")
# Model names as providers spell them: `gpt-4.1-mini`, `llama3.1:8b`, `claude_3_5`.
MODEL_NAME_MAX = 64
_MODEL_NAME = re.compile(r"^[a-zA-Z0-9](?:[a-zA-Z0-9._:-]{0,62}[a-zA-Z0-9])?$")
_PREFIXED = re.compile(
    r"^(?P<prefix>[a-z]+)-(?P<uuid>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$"
)


def new_id(prefix: str) -> str:
    """A fresh `<prefix>-<uuid4>` identifier, e.g. `op-3f2a…`.

    The version 4 UUID is written out directly from 16 random bytes: `uuid.uuid4()` and its
    `str()` cost more than twice as much, several times per request.
    """
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = raw.hex()
    return f"{prefix}-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def is_slug(value: str) -> bool:
    """Whether `value` is a slug: alphanumerics and inner hyphens, at most 50 characters."""
    return bool(_SLUG.match(value))


def is_model_name(value: str) -> bool:
    """Whether `value` can name a model: alphanumerics with inner `.`, `_`, `:` and `-`."""
    return bool(_MODEL_NAME.match(value))


def check_slug(kind: str, value: str, *, param: str = "id") -> str:
    """Return `value` if it is a valid slug, else raise `InvalidId`."""
    if not is_slug(value):
        raise InvalidId(kind, value, param=param)
    return value


def check_prefixed(kind: str, prefix: str, value: str, *, param: str = "id") -> str:
    """Return `value` if it is `<prefix>-<uuid>`, else raise `InvalidId`."""
    match = _PREFIXED.match(value)
    if match is None or match.group("prefix") != prefix:
        raise InvalidId(kind, value, param=param)
    return value
