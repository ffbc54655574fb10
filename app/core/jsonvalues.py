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


def unencodable(value: object) -> tuple[str, str] | None:
    """The dotted path of the first value in `value` that cannot go on as JSON, and why.

    JSON numbers have no size limit and JSON strings may escape half a UTF-16 pair, but the
    serializer of job inputs, cache keys and upstream calls (orjson), PostgreSQL and OpenAI's
    own parameters stop at 64-bit integers, finite numbers and encodable text: such a value is
    refused where it enters rather than failing later inside a job or an upstream call. A key
    that is such text is named with its surrogate escaped, so the error itself can be sent.
    """
    found = _first_unencodable(value)
    if found is None:
        return None
    reversed_path, reason = found
    return ".".join(reversed(reversed_path)), reason


def _first_unencodable(value: object) -> tuple[list[str], str] | None:
    # Every request is walked: the path is built only for the value refused, innermost first.
    # The surrogate test is inlined (isascii first): most text is ASCII, and a call costs more.
    if isinstance(value, str):
        return None if value.isascii() or not _SURROGATE.search(value) else ([], LONE_SURROGATE)
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return None if INT64_MIN <= value <= INT64_MAX else ([], OUT_OF_INT64)
    if isinstance(value, float):
        return None if math.isfinite(value) else ([], NOT_FINITE)
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and not key.isascii() and _SURROGATE.search(key):
                return [escaped(key)], LONE_SURROGATE
            found = _first_unencodable(item)
            if found is not None:
                found[0].append(str(key))
                return found
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = _first_unencodable(item)
            if found is not None:
                found[0].append(str(index))
                return found
    return None
