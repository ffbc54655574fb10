"""JSON Schema checks: a workflow's input, and a step's output, against their schemas."""

from __future__ import annotations

from typing import Any

import orjson
from jsonschema.exceptions import SchemaError
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for

from app.core.errors import InvalidInput

# Compiled validators by their schema's canonical text; definitions are few, runs are many.
_COMPILED: dict[bytes, Validator] = {}
_MAX_COMPILED = 1024


def _validator(schema: Any) -> Validator:
    """The validator of the draft `schema` declares (the newest by default); `SchemaError` when
    the schema itself is not valid."""
    key = orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)
    found = _COMPILED.get(key)
    if found is None:
        if len(_COMPILED) >= _MAX_COMPILED:
            _COMPILED.clear()
        cls = validator_for(schema)
        cls.check_schema(schema)
        found = _COMPILED[key] = cls(schema)
    return found


def check_schema(schema: Any, *, param: str) -> None:
    """Refuse a schema that is not valid JSON Schema (`InvalidInput` naming `param`)."""
    if not isinstance(schema, dict | bool):
        raise InvalidInput(f"{param}: a JSON Schema is an object", param=param)
    try:
        _validator(schema)
    except SchemaError as exc:
        first = exc.message.splitlines()[0]
        raise InvalidInput(f"{param}: not a valid JSON Schema: {first}", param=param) from exc


def schema_error(schema: Any, value: Any) -> tuple[str, str] | None:
    """Where `value` first breaks `schema` (a dotted path, empty for the value itself) and why;
    None when it conforms."""
    for error in _validator(schema).iter_errors(value):
        return ".".join(str(p) for p in error.absolute_path), error.message
    return None


def check_value(schema: Any, value: Any, *, param: str) -> None:
    """Refuse `value` unless it conforms to `schema`; the error names the field (`param.path`)."""
    found = schema_error(schema, value)
    if found is not None:
        path, message = found
        field = f"{param}.{path}" if path else param
        raise InvalidInput(f"{field}: {message}", param=field)
