"""Metadata filters of a search: parsed and checked once, then applied to each chunk in Python.

A filter is a condition `{"field": "lang", "op": "eq", "value": "en"}` or a combination
`{"and": [...]}`, `{"or": [...]}`, `{"not": {...}}`. A field is a dotted path into the
document's metadata (`author.name`), or one of the chunk's own fields, which start with `_`
(`BUILTIN_FIELDS`). Filters never become SQL: every backend applies them here, the same way.

Semantics, for every backend:
- `eq`, `in`: the field is present and equal (numbers by value, `true` is not `1`);
  `ne`, `nin` are their negations, so a chunk without the field matches them;
- `gt`, `gte`, `lt`, `lte`: the field and the value are both numbers or both strings;
- `exists` (`value` true by default): the field is present and not null;
- `contains`: a string field holds the value as a substring, or a list field holds an equal
  element.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from app.core.errors import InvalidInput

OPERATORS = ("eq", "ne", "gt", "gte", "lt", "lte", "in", "nin", "exists", "contains")
BUILTIN_FIELDS = (
    "_document_id",
    "_chunk_index",
    "_title",
    "_filename",
    "_content_type",
    "_headings",
    "_page",
    "_row",
)
MAX_DEPTH = 10
MAX_CONDITIONS = 100
MAX_LIST = 100
MAX_FIELD = 200


@dataclass(frozen=True, slots=True)
class ChunkView:
    """What a filter reads of one chunk: its document's metadata, and its own fields."""

    metadata: Mapping[str, Any]
    builtins: Mapping[str, Any]


Predicate = Callable[[ChunkView], bool]
_MISSING = object()


@dataclass(frozen=True, slots=True)
class Filter:
    """A checked filter: its canonical form (a cache key) and the predicate it compiles to."""

    canonical: str
    matches: Predicate


def parse_filter(raw: Any, *, param: str = "filter") -> Filter | None:
    """The filter `raw` describes (None for none); a 400 naming the part that is wrong."""
    if raw is None or raw == {}:
        return None
    counter = [0]
    predicate, canonical = _node(raw, param, 0, counter)
    return Filter(canonical, predicate)


def _fail(message: str, where: str) -> InvalidInput:
    return InvalidInput(f"{where}: {message}", param=where)


def _node(raw: Any, where: str, depth: int, counter: list[int]) -> tuple[Predicate, str]:
    if depth >= MAX_DEPTH:
        raise _fail(f"filters nest at most {MAX_DEPTH} deep", where)
    if not isinstance(raw, Mapping):
        raise _fail("a filter is an object: a condition or one of and, or, not", where)
    combinators = [k for k in ("and", "or", "not") if k in raw]
    if combinators:
        if len(raw) != 1:
            extra = sorted(set(raw) - {combinators[0]})
            raise _fail(f"'{combinators[0]}' stands alone; unexpected {extra}", where)
        (key,) = combinators
        if key == "not":
            inner, text = _node(raw["not"], f"{where}.not", depth + 1, counter)
            return (lambda view: not inner(view)), f'{{"not":{text}}}'
        members = raw[key]
        if not isinstance(members, list) or not members:
            raise _fail(f"'{key}' takes a non-empty list of filters", f"{where}.{key}")
        parts = [
            _node(member, f"{where}.{key}.{i}", depth + 1, counter)
            for i, member in enumerate(members)
        ]
        predicates = tuple(p for p, _ in parts)
        texts = ",".join(t for _, t in parts)
        if key == "and":
            return (lambda view: all(p(view) for p in predicates)), f'{{"and":[{texts}]}}'
        return (lambda view: any(p(view) for p in predicates)), f'{{"or":[{texts}]}}'
    return _condition(raw, where, counter)


def _condition(raw: Mapping[str, Any], where: str, counter: list[int]) -> tuple[Predicate, str]:
    counter[0] += 1
    if counter[0] > MAX_CONDITIONS:
        raise _fail(f"a filter has at most {MAX_CONDITIONS} conditions", where)
    unexpected = sorted(set(raw) - {"field", "op", "value"})
    if unexpected:
        raise _fail(f"unexpected {unexpected}; a condition has field, op and value", where)
    field = raw.get("field")
    if not isinstance(field, str) or not field or len(field) > MAX_FIELD:
        raise _fail(f"field must be a name of 1 to {MAX_FIELD} characters", f"{where}.field")
    if field.startswith("_") and field not in BUILTIN_FIELDS:
        raise _fail(
            f"unknown field '{field}'; the chunk's own fields are {', '.join(BUILTIN_FIELDS)}",
            f"{where}.field",
        )
    op = raw.get("op")
    if op not in OPERATORS:
        raise _fail(f"op must be one of {', '.join(OPERATORS)}", f"{where}.op")
    value = raw.get("value", True if op == "exists" else _MISSING)
    at = f"{where}.value"
    if value is _MISSING:
        raise _fail(f"'{op}' needs a value", at)
    value = _checked_value(op, value, at)
    read = _reader(field)
    test = _TESTS[op]
    canonical = _canonical(field, op, value)
    return (lambda view: test(read(view), value)), canonical


def _checked_value(op: str, value: Any, at: str) -> Any:
    if op == "exists":
        if not isinstance(value, bool):
            raise _fail("'exists' takes true or false", at)
        return value
    if op in ("in", "nin"):
        if not isinstance(value, list) or not value or len(value) > MAX_LIST:
            raise _fail(f"'{op}' takes a list of 1 to {MAX_LIST} values", at)
        for i, item in enumerate(value):
            _scalar(item, f"{at}.{i}")
        return tuple(value)
    if op in ("gt", "gte", "lt", "lte"):
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise _fail(f"'{op}' compares with a number or a string", at)
        _scalar(value, at)
        return value
    _scalar(value, at)
    if op == "contains" and value is None:
        raise _fail("'contains' takes a string, number or boolean", at)
    return value


def _scalar(value: Any, at: str) -> None:
    if value is not None and not isinstance(value, str | int | float | bool):
        raise _fail("values are strings, numbers, booleans or null", at)
    if isinstance(value, float) and not math.isfinite(value):
        raise _fail("numbers must be finite", at)
    if isinstance(value, str) and len(value) > 10_000:
        raise _fail("strings are at most 10000 characters", at)


def _canonical(field: str, op: str, value: Any) -> str:
    shown = list(value) if isinstance(value, tuple) else value
    return orjson.dumps({"field": field, "op": op, "value": shown}).decode()


def _reader(field: str) -> Callable[[ChunkView], Any]:
    if field.startswith("_"):
        return lambda view: view.builtins.get(field, _MISSING)
    path = tuple(field.split("."))
    if len(path) == 1:
        return lambda view: view.metadata.get(field, _MISSING)

    def read(view: ChunkView) -> Any:
        current: Any = view.metadata
        for step in path:
            if isinstance(current, Mapping):
                current = current.get(step, _MISSING)
            elif isinstance(current, list) and step.isdigit() and int(step) < len(current):
                current = current[int(step)]
            else:
                return _MISSING
            if current is _MISSING:
                return _MISSING
        return current

    return read


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _equal(found: Any, value: Any) -> bool:
    if isinstance(found, bool) or isinstance(value, bool):
        return isinstance(found, bool) and isinstance(value, bool) and found == value
    if _is_number(found) and _is_number(value):
        return bool(found == value)
    if found is None or value is None:
        return found is None and value is None
    return type(found) is type(value) and bool(found == value)


def _ordered(found: Any, value: Any) -> bool:
    """Whether the two can be compared: both numbers, or both strings."""
    return (_is_number(found) and _is_number(value)) or (
        isinstance(found, str) and isinstance(value, str)
    )


def _contains(found: Any, value: Any) -> bool:
    if isinstance(found, str):
        return isinstance(value, str) and value in found
    if isinstance(found, list):
        return any(_equal(item, value) for item in found)
    return False


def _in(found: Any, values: Sequence[Any]) -> bool:
    return found is not _MISSING and any(_equal(found, v) for v in values)


_TESTS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": lambda found, value: found is not _MISSING and _equal(found, value),
    "ne": lambda found, value: found is _MISSING or not _equal(found, value),
    "gt": lambda found, value: _ordered(found, value) and found > value,
    "gte": lambda found, value: _ordered(found, value) and found >= value,
    "lt": lambda found, value: _ordered(found, value) and found < value,
    "lte": lambda found, value: _ordered(found, value) and found <= value,
    "in": _in,
    "nin": lambda found, values: not _in(found, values),
    "exists": lambda found, value: (found is not _MISSING and found is not None) == value,
    "contains": lambda found, value: found is not _MISSING and _contains(found, value),
}
