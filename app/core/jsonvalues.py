"""Checks on JSON values a client sent, for limits that JSON itself does not have."""

from __future__ import annotations

import math
import re

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

# A UTF-16 surrogate alone: JSON's `\ud800` escape parses to one, and UTF-8 cannot encode it.
_SURROGATE = re.compile("[\ud800-\udfff]")
LONE_SURROGATE = "text must not contain a lone UTF-16 surrogate (such as \\ud800)"
NOT_FINITE = "numbers must be finite"
OUT_OF_INT64 = f"integers must fit in 64 bits (from {INT64_MIN} to {INT64_MAX})"


def has_lone_surrogate(text: str) -> bool:
    """Whether `text` holds a surrogate code point, which no UTF-8 encoder accepts."""
    return not text.isascii() and _SURROGATE.search(text) is not None


def escaped(text: str) -> str:
    """`text` with any lone surrogate written as its escape, so an error can quote it."""
    return text.encode("utf-8", "backslashreplace").decode() if has_lone_surrogate(text) else text


def unencodable(value: object, path: str = "") -> tuple[str, str] | None:
    """The dotted path of the first value in `value` that cannot go on as JSON, and why.

    JSON numbers have no size limit and JSON strings may escape half a UTF-16 pair, but the
    serializer of job inputs, cache keys and upstream calls (orjson), PostgreSQL and OpenAI's
    own parameters stop at 64-bit integers, finite numbers and encodable text: such a value is
    refused where it enters rather than failing later inside a job or an upstream call. A key
    that is such text is named with its surrogate escaped, so the error itself can be sent.
    """
    if isinstance(value, str):
        if has_lone_surrogate(value):
            return path, LONE_SURROGATE
        return None
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        if INT64_MIN <= value <= INT64_MAX:
            return None
        return path, OUT_OF_INT64
    if isinstance(value, float):
        return None if math.isfinite(value) else (path, NOT_FINITE)
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and has_lone_surrogate(key):
                key = escaped(key)
                return (f"{path}.{key}" if path else key), LONE_SURROGATE
            found = unencodable(item, f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = unencodable(item, f"{path}.{index}" if path else str(index))
            if found is not None:
                return found
    return None
