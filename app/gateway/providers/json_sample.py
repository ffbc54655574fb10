"""A value that fits a JSON Schema, built from the schema alone: the mock's structured answers.

It follows what tool parameters and `response_format` schemas use: `type` (the first non-null
one of a list), `properties` and `required`, `items`/`prefixItems` with `minItems`/`maxItems`
and `uniqueItems`, `enum` (its first value), `const`, `default`, `anyOf`/`oneOf` (the first
branch), `allOf` (merged), `$ref` into the schema's own `$defs` or `definitions`, string
lengths and formats (date, date-time, time, email, uuid, uri, hostname, ipv4, ipv6), and
number bounds with `multipleOf`. A `pattern` is met only by luck. A schema it cannot read is a
`SchemaError` whose message says where.
"""

from __future__ import annotations

import math
import re
from typing import Any

_TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")
_FORMATS = {
    "date": "2024-01-01",
    "date-time": "2024-01-01T12:00:00Z",
    "time": "12:00:00Z",
    "email": "mock@example.com",
    "idn-email": "mock@example.com",
    "uuid": "00000000-0000-4000-8000-000000000000",
    "uri": "https://example.com/mock",
    "url": "https://example.com/mock",
    "iri": "https://example.com/mock",
    "uri-reference": "https://example.com/mock",
    "hostname": "example.com",
    "idn-hostname": "example.com",
    "ipv4": "192.0.2.1",
    "ipv6": "2001:db8::1",
    "duration": "P1D",
}
# From this depth on, an object gets only its required properties and an array only its
# required items, so recursive schemas end.
_ALL_PROPERTIES_DEPTH = 4
_MAX_DEPTH = 64


class SchemaError(ValueError):
    """A schema the generator cannot follow (malformed, unsatisfiable, or too deep)."""


def sample(schema: Any) -> Any:
    """A value that validates against `schema` (a JSON Schema as decoded JSON)."""
    return _Sampler(schema).value(schema, "", 0, 0)


class _Sampler:
    def __init__(self, root: Any) -> None:
        self.root = root

    def value(self, schema: Any, where: str, depth: int, variant: int) -> Any:
        if depth > _MAX_DEPTH:
            raise SchemaError(
                f"the schema nests more than {_MAX_DEPTH} levels deep: does each level require "
                "the next?"
            )
        if schema is True:
            return "mock"
        if schema is False:
            raise SchemaError(f"'{where or '/'}' is the schema false, which nothing satisfies")
        if not isinstance(schema, dict):
            raise SchemaError(f"'{where or '/'}' must be a schema object or a boolean")
        schema = self.expand(schema, where, depth)
        if "const" in schema:
            return schema["const"]
        if "default" in schema:
            return schema["default"]
        if "enum" in schema:
            options = schema["enum"]
            if not isinstance(options, list) or not options:
                raise SchemaError(f"'{where}/enum' must be a non-empty list")
            return options[variant % len(options)]
        kind = self.kind(schema, where)
        if kind == "object":
            return self.object(schema, where, depth, variant)
        if kind == "array":
            return self.array(schema, where, depth)
        if kind == "string":
            return _string(schema, variant)
        if kind in ("integer", "number"):
            return _number(schema, kind == "integer", variant)
        if kind == "boolean":
            return variant % 2 == 0
        return None

    def expand(self, schema: dict[str, Any], where: str, depth: int) -> dict[str, Any]:
        """`schema` with its `$ref`, `allOf` and first `anyOf`/`oneOf` branch merged in."""
        for _ in range(_MAX_DEPTH):
            ref = schema.get("$ref")
            branches = schema.get("anyOf", schema.get("oneOf"))
            merged = schema.get("allOf")
            if ref is None and branches is None and merged is None:
                return schema
            rest = {k: v for k, v in schema.items() if k not in ("$ref", "anyOf", "oneOf", "allOf")}
            if ref is not None:
                rest = {**self.resolve(ref, where), **rest}
            if branches is not None:
                if not isinstance(branches, list) or not branches:
                    raise SchemaError(
                        f"'{where}/anyOf' and '{where}/oneOf' must be non-empty lists"
                    )
                rest = _merge(rest, self.branch(branches[0], where))
            if merged is not None:
                if not isinstance(merged, list):
                    raise SchemaError(f"'{where}/allOf' must be a list")
                for part in merged:
                    rest = _merge(rest, self.branch(part, where))
            schema = rest
        raise SchemaError(f"'{where or '/'}' refers to itself without end")

    def branch(self, part: Any, where: str) -> dict[str, Any]:
        if part is True:
            return {}
        if not isinstance(part, dict):
            raise SchemaError(f"a branch of '{where or '/'}' must be a schema object")
        return part

    def resolve(self, ref: Any, where: str) -> dict[str, Any]:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise SchemaError(f"'{where}/$ref' must point inside the schema (start with '#')")
        target: Any = self.root
        for part in ref[1:].lstrip("/").split("/") if ref != "#" else []:
            name = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or name not in target:
                raise SchemaError(f"'{where}/$ref' points at {ref}, which the schema lacks")
            target = target[name]
        if not isinstance(target, dict):
            raise SchemaError(f"'{where}/$ref' points at {ref}, which is not a schema object")
        return target

    def kind(self, schema: dict[str, Any], where: str) -> str:
        declared = schema.get("type")
        if declared is None:
            if "properties" in schema or "required" in schema:
                return "object"
            if "items" in schema or "prefixItems" in schema:
                return "array"
            return "string"
        names = declared if isinstance(declared, list) else [declared]
        if not names or any(name not in _TYPES for name in names):
            raise SchemaError(
                f"'{where}/type' must be one of {', '.join(_TYPES)} or a list of them"
            )
        useful = [name for name in names if name != "null"]
        return str(useful[0] if useful else "null")

    def object(self, schema: dict[str, Any], where: str, depth: int, variant: int) -> Any:
        properties = schema.get("properties", {})
        required = schema.get("required", [])
        if not isinstance(properties, dict):
            raise SchemaError(f"'{where}/properties' must be an object")
        if not isinstance(required, list) or not all(isinstance(n, str) for n in required):
            raise SchemaError(f"'{where}/required' must be a list of property names")
        names = list(properties) if depth < _ALL_PROPERTIES_DEPTH else []
        names += [name for name in required if name not in names]
        extra = schema.get("additionalProperties", True)
        result: dict[str, Any] = {}
        for name in names:
            inner = properties.get(name, extra if isinstance(extra, dict) else True)
            result[name] = self.value(inner, f"{where}/properties/{name}", depth + 1, variant)
        return result

    def array(self, schema: dict[str, Any], where: str, depth: int) -> list[Any]:
        prefix = schema.get("prefixItems")
        items = schema.get("items", True)
        if isinstance(items, list):  # draft 4 to 7 spell a tuple this way
            prefix, items = items, schema.get("additionalItems", True)
        prefix = prefix or []
        if not isinstance(prefix, list):
            raise SchemaError(f"'{where}/prefixItems' must be a list of schemas")
        low, high = schema.get("minItems", 0), schema.get("maxItems")
        if not isinstance(low, int) or (high is not None and not isinstance(high, int)):
            raise SchemaError(f"'{where}/minItems' and '{where}/maxItems' must be integers")
        # One item where none is required, except as deep as objects drop their optional
        # properties (so a recursive schema ends there too).
        count = max(low, len(prefix), 1 if depth < _ALL_PROPERTIES_DEPTH else 0)
        if high is not None:
            count = min(count, high)
        if items is False:
            count = min(count, len(prefix))
        # Items differ from each other only where they must.
        unique = schema.get("uniqueItems") is True
        result = []
        for index in range(count):
            inner = prefix[index] if index < len(prefix) else items
            variant = index if unique else 0
            result.append(self.value(inner, f"{where}/items/{index}", depth + 1, variant))
        return result


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Two schemas in one: properties and required lists joined, other keywords from `extra`."""
    merged = {**base, **extra}
    if "properties" in base and "properties" in extra:
        merged["properties"] = {**base["properties"], **extra["properties"]}
    if "required" in base and "required" in extra:
        merged["required"] = [*base["required"], *extra["required"]]
    return merged


def _string(schema: dict[str, Any], variant: int) -> str:
    text = _FORMATS.get(str(schema.get("format")), "mock")
    if variant and text == "mock":
        text = f"mock-{variant}"
    low, high = schema.get("minLength"), schema.get("maxLength")
    if isinstance(low, int) and len(text) < low:
        text += "x" * (low - len(text))
    if isinstance(high, int) and len(text) > high:
        text = text[:high]
    pattern = schema.get("pattern")
    if isinstance(pattern, str):
        try:
            compiled = re.compile(pattern)
        except re.error:
            return text
        for candidate in (text, "mock", "a", "A", "0", "1", "abc", "ABC", "a1", ""):
            if compiled.search(candidate):
                return candidate
    return text


def _number(schema: dict[str, Any], integer: bool, variant: int) -> int | float:
    low: float = -math.inf
    high: float = math.inf
    step = 1 if integer else 0.5
    minimum, maximum = schema.get("minimum"), schema.get("maximum")
    above, below = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    if isinstance(minimum, int | float) and not isinstance(minimum, bool):
        low = minimum + step if above is True else minimum  # draft 4's boolean form
    if isinstance(maximum, int | float) and not isinstance(maximum, bool):
        high = maximum - step if below is True else maximum
    if isinstance(above, int | float) and not isinstance(above, bool):
        low = max(low, above + step)
    if isinstance(below, int | float) and not isinstance(below, bool):
        high = min(high, below - step)
    value: float = 1 + variant
    if value < low:
        value = low + variant
    if value > high:
        value = high
    multiple = schema.get("multipleOf")
    if isinstance(multiple, int | float) and not isinstance(multiple, bool) and multiple > 0:
        value = math.ceil(value / multiple) * multiple
        if value > high:
            value -= multiple
    if integer:
        whole = math.ceil(value)
        return whole if whole <= high else math.floor(value)
    return value
