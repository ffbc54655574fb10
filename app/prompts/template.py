"""Prompt templates: `${var:name}` and `${var:name:default}` placeholders.

The rules, in full:

- `${var:NAME}` is a required variable; `${var:NAME:DEFAULT}` an optional one whose
  default is everything up to the next `}` (so a default cannot contain `}`, and
  `${var:NAME:}` has the empty string as its default).
- NAME starts with a letter, digit or `_` and continues with letters, digits, `_` or `-`
  (at most 64 characters).
- `$${` renders as a literal `${` and starts no placeholder: `$${var:x}` renders `${var:x}`.
- Anything after `${var:` that does not follow this grammar is refused when the template is
  saved (a typo must not silently render as text). Other `${...}` forms, such as
  `${request:field}` or a shell snippet, are not ours and are left exactly as written.
- Values are inserted as they are and never scanned again, so a value containing
  `${var:x}` cannot pull in another variable.
- A variable used several times is required if any use has no default; each use falls
  back to its own default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

NAME_PATTERN = r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}"
_TOKEN = re.compile(r"\$\$\{|\$\{var:")
_PLACEHOLDER_REST = re.compile(rf"(?P<name>{NAME_PATTERN})(?::(?P<default>[^}}]*))?\}}")


class TemplateSyntaxError(ValueError):
    """A `${var:` placeholder that does not follow the grammar."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


class MissingVariables(ValueError):
    """Required variables that were not given a value."""

    def __init__(self, names: list[str]) -> None:
        quoted = ", ".join(f"'{n}'" for n in names)
        noun = "variable" if len(names) == 1 else "variables"
        super().__init__(f"missing required {noun} {quoted}")
        self.names = names


@dataclass(frozen=True, slots=True)
class Placeholder:
    name: str
    default: str | None


@dataclass(frozen=True, slots=True)
class Variable:
    """A variable a template uses: whether a value must be given, and its first default."""

    name: str
    required: bool
    default: str | None

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "required": self.required, "default": self.default}


@dataclass(frozen=True, slots=True)
class Template:
    """A parsed template: literal text and placeholders, in order."""

    parts: tuple[str | Placeholder, ...]

    @property
    def variables(self) -> list[Variable]:
        found: dict[str, Variable] = {}
        for part in self.parts:
            if not isinstance(part, Placeholder):
                continue
            seen = found.get(part.name)
            if seen is None:
                found[part.name] = Variable(part.name, part.default is None, part.default)
            elif part.default is None and not seen.required:
                found[part.name] = Variable(part.name, True, seen.default)
        return list(found.values())

    def render(self, values: dict[str, str]) -> str:
        """The text with every placeholder replaced; raises `MissingVariables`."""
        out: list[str] = []
        missing: list[str] = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
            elif part.name in values:
                out.append(values[part.name])
            elif part.default is not None:
                out.append(part.default)
            elif part.name not in missing:
                missing.append(part.name)
        if missing:
            raise MissingVariables(missing)
        return "".join(out)


@lru_cache(maxsize=1024)
def parse(content: str) -> Template:
    """Parse `content` (cached: the same prompt is rendered on every chat request using it)."""
    parts: list[str | Placeholder] = []
    literal: list[str] = []
    pos = 0
    for token in _TOKEN.finditer(content):
        start = token.start()
        if start < pos:
            continue  # inside a placeholder already consumed
        literal.append(content[pos:start])
        if token.group() == "$${":
            literal.append("${")
            pos = token.end()
            continue
        match = _PLACEHOLDER_REST.match(content, token.end())
        if match is None:
            snippet = content[start : start + 40]
            raise TemplateSyntaxError(
                f"invalid placeholder at character {start}: '{snippet}' (expected "
                "${var:name} or ${var:name:default}; a name uses letters, digits, _ and -; "
                "write $${ for a literal ${)",
                start,
            )
        if text := "".join(literal):
            parts.append(text)
        literal = []
        parts.append(Placeholder(match.group("name"), match.group("default")))
        pos = match.end()
    literal.append(content[pos:])
    if text := "".join(literal):
        parts.append(text)
    return Template(tuple(parts))
