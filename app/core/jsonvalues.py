"""Checks on JSON values a client sent, for limits that JSON itself does not have."""

from __future__ import annotations

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


def out_of_range_int(value: object, path: str = "") -> str | None:
    """The dotted path of the first integer in `value` outside the signed 64-bit range, if any.

    JSON numbers have no size limit, but the serializer of job inputs, cache keys and upstream
    calls (orjson), PostgreSQL's bigint and OpenAI's own parameters stop at 64 bits: such a value
    is refused where it enters rather than failing later inside a job or an upstream call.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return None if INT64_MIN <= value <= INT64_MAX else path
    if isinstance(value, dict):
        for key, item in value.items():
            found = out_of_range_int(item, f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = out_of_range_int(item, f"{path}.{index}" if path else str(index))
            if found is not None:
                return found
    return None
