"""References inside step fields: `${request:path:default}`, `${step:name:path:default}` and,
inside a `map` step, `${item:path:default}`.

The rules:

- `request` is the run's input, `step:name` the output of an earlier step, `item` the item a
  `map` step is on. A path of dot-separated keys follows objects, and numeric keys index arrays
  (`documents.0.content`); an empty path means the whole value (`${step:search}`, `${item}`).
- What follows the path after a `:` is the default, used when the value is missing or null; it
  is read as JSON when it parses (`${request:top_k:5}` is the number 5), else as text.
- A field that is exactly one reference takes the referenced value as it is (an object stays an
  object). Inside longer text, a reference is replaced by its text: null as empty, strings as
  they are, anything else as compact JSON. `$${` writes a literal `${`.
- A missing value without a default is an error naming the reference; a null one is null.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from app.core.errors import InvalidInput

NAME = r"[A-Za-z0-9_-]+"
PATH = r"[A-Za-z0-9_.-]*"
_TOKEN = re.compile(r"\$\$\{|\$\{(?P<source>request|step|item)(?::(?P<body>[^}]*))?\}")
_STEP_BODY = re.compile(rf"(?P<name>{NAME})(?::(?P<path>{PATH})(?::(?P<default>.*))?)?\Z", re.S)
_VALUE_BODY = re.compile(rf"(?P<path>{PATH})(?::(?P<default>.*))?\Z", re.S)
_MISSING: Any = object()


@dataclass(frozen=True, slots=True)
class Reference:
    """One `${...}` reference as written."""

    text: str
    source: str  # request, step or item
    name: str | None  # the step's, for `step`
    path: tuple[str, ...]
    default: Any = _MISSING

    @property
    def has_default(self) -> bool:
        return self.default is not _MISSING


def _default(raw: str | None) -> Any:
    if raw is None:
        return _MISSING
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw


def _path(raw: str | None) -> tuple[str, ...]:
    return tuple(p for p in (raw or "").split(".") if p)


def parse(match: re.Match[str]) -> Reference:
    """The reference a token match spells, or `InvalidInput` for a malformed one."""
    text, source, body = match.group(0), match.group("source"), match.group("body")
    if source == "step":
        found = _STEP_BODY.match(body or "")
        if found is None:
            raise InvalidInput(f"'{text}' is not a reference: write ${{step:name:path:default}}")
        return Reference(
            text, source, found["name"], _path(found["path"]), _default(found["default"])
        )
    found = _VALUE_BODY.match(body or "")
    if found is None:
        raise InvalidInput(f"'{text}' is not a reference: write ${{{source}:path:default}}")
    return Reference(text, source, None, _path(found["path"]), _default(found["default"]))


def references(value: Any, where: str = "") -> Iterator[tuple[str, Reference]]:
    """Every reference in a JSON value, with the dotted path of the field holding it."""
    if isinstance(value, str):
        for match in _TOKEN.finditer(value):
            if match.group("source") is not None:
                yield where, parse(match)
    elif isinstance(value, dict):
        for key, inner in value.items():
            yield from references(inner, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            yield from references(inner, f"{where}[{index}]")


@dataclass
class Scope:
    """What references can see: the run's input, the outputs of the steps run so far in this
    sequence and the ones enclosing it, and the item of the nearest `map`."""

    request: Any
    outputs: dict[str, Any] = field(default_factory=dict)
    parent: Scope | None = None
    item: Any = _MISSING

    def child(self, item: Any = _MISSING) -> Scope:
        """The scope of a nested sequence (a branch, or one item of a map)."""
        return Scope(self.request, {}, self, item)

    def output(self, name: str) -> Any:
        scope: Scope | None = self
        while scope is not None:
            if name in scope.outputs:
                return scope.outputs[name]
            scope = scope.parent
        return _MISSING

    def current_item(self) -> Any:
        scope: Scope | None = self
        while scope is not None:
            if scope.item is not _MISSING:
                return scope.item
            scope = scope.parent
        return _MISSING

    def lookup(self, ref: Reference) -> Any:
        """The value `ref` names (its default when missing or null), or `InvalidInput`."""
        if ref.source == "request":
            base, what = self.request, "the input"
        elif ref.source == "item":
            base, what = self.current_item(), "the map item"
        else:
            assert ref.name is not None
            base, what = self.output(ref.name), f"step '{ref.name}'"
            if base is _MISSING:
                if ref.has_default:
                    return ref.default
                raise InvalidInput(f"{ref.text}: {what} has no output (not run yet)")
        value = _follow(base, ref.path)
        if value is _MISSING or value is None:
            if ref.has_default:
                return ref.default
            if value is _MISSING:
                shown = ".".join(ref.path)
                raise InvalidInput(f"{ref.text}: {what} has no field '{shown}'")
        return value

    def resolve(self, value: Any) -> Any:
        """`value` with every reference in it replaced (see the module's rules)."""
        if isinstance(value, str):
            return self._text(value)
        if isinstance(value, dict):
            return {key: self.resolve(inner) for key, inner in value.items()}
        if isinstance(value, list):
            return [self.resolve(inner) for inner in value]
        return value

    def _text(self, text: str) -> Any:
        if "${" not in text:
            return text
        whole = _TOKEN.fullmatch(text)
        if whole is not None and whole.group("source") is not None:
            return self.lookup(parse(whole))
        parts: list[str] = []
        last = 0
        for match in _TOKEN.finditer(text):
            parts.append(text[last : match.start()])
            if match.group("source") is None:
                parts.append("${")
            else:
                parts.append(as_text(self.lookup(parse(match))))
            last = match.end()
        parts.append(text[last:])
        return "".join(parts)


def _follow(value: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if isinstance(value, dict):
            value = value.get(key, _MISSING)
        elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            return _MISSING
        if value is _MISSING:
            return value
    return value


def as_text(value: Any) -> str:
    """A value as a reference inside text shows it."""
    if value is None or value is _MISSING:
        return ""
    if isinstance(value, str):
        return value
    return orjson.dumps(value).decode()
