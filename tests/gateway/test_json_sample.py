"""The mock's JSON Schema samples: every one validates against its schema (checked by an
independent validator, with formats asserted), and unreadable schemas say where they fail."""

from __future__ import annotations

from typing import Any

import jsonschema_rs
import pytest

from app.gateway.providers.json_sample import SchemaError, sample

ADDRESS = {
    "type": "object",
    "properties": {
        "street": {"type": "string", "minLength": 8},
        "zip": {"type": "string", "maxLength": 3},
        "country": {"enum": ["FR", "DE"]},
    },
    "required": ["street", "zip", "country"],
    "additionalProperties": False,
}

SCHEMAS: dict[str, Any] = {
    "empty": {},
    "true": True,
    "string": {"type": "string"},
    "nullable": {"type": ["null", "integer"]},
    "formats": {
        "type": "object",
        "properties": {
            name: {"type": "string", "format": name}
            for name in ("date", "date-time", "time", "email", "uuid", "uri", "hostname", "ipv4")
        },
        "required": ["date", "date-time", "email", "uuid"],
    },
    "bounded numbers": {
        "type": "object",
        "properties": {
            "big": {"type": "integer", "minimum": 100},
            "small": {"type": "integer", "maximum": -5},
            "between": {"type": "number", "exclusiveMinimum": 2, "exclusiveMaximum": 3},
            "step": {"type": "integer", "minimum": 11, "multipleOf": 5},
            "fraction": {"type": "integer", "maximum": 3.5},
        },
        "required": ["big", "small", "between", "step", "fraction"],
    },
    "draft 4 exclusive bounds": {
        "$schema": "http://json-schema.org/draft-04/schema#",
        "type": "integer",
        "minimum": 1,
        "exclusiveMinimum": True,
    },
    "const and default": {
        "type": "object",
        "properties": {
            "kind": {"const": "invoice"},
            "currency": {"type": "string", "default": "EUR"},
            "flag": {"type": "boolean"},
        },
        "required": ["kind", "currency", "flag"],
    },
    "arrays": {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 3},
            "distinct": {
                "type": "array",
                "items": {"type": "integer"},
                "minItems": 4,
                "uniqueItems": True,
            },
            "distinct_enums": {
                "type": "array",
                "items": {"enum": ["a", "b", "c"]},
                "minItems": 3,
                "uniqueItems": True,
            },
            "none": {"type": "array", "maxItems": 0},
            "pair": {
                "type": "array",
                "prefixItems": [{"type": "integer"}, {"type": "string"}],
                "items": False,
            },
        },
        "required": ["tags", "distinct", "distinct_enums", "none", "pair"],
    },
    "nested": {
        "type": "object",
        "properties": {
            "customer": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "address": ADDRESS},
                "required": ["name", "address"],
            },
            "lines": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}},
                    "required": ["sku", "qty"],
                },
                "minItems": 2,
            },
        },
        "required": ["customer", "lines"],
    },
    "refs": {
        "$defs": {"address": ADDRESS, "id": {"type": "string", "format": "uuid"}},
        "type": "object",
        "properties": {
            "home": {"$ref": "#/$defs/address"},
            "owner": {"$ref": "#/$defs/id"},
        },
        "required": ["home", "owner"],
    },
    "recursive": {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {
                    "label": {"type": "string"},
                    "children": {"type": "array", "items": {"$ref": "#/$defs/node"}},
                },
                "required": ["label", "children"],
            }
        },
        "$ref": "#/$defs/node",
    },
    "any and one of": {
        "type": "object",
        "properties": {
            "either": {"anyOf": [{"type": "integer", "minimum": 7}, {"type": "string"}]},
            "one": {"oneOf": [{"type": "string", "format": "email"}, {"type": "integer"}]},
        },
        "required": ["either", "one"],
    },
    "all of": {
        "allOf": [
            {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
            {"properties": {"b": {"type": "integer"}}, "required": ["b"]},
        ]
    },
    "strict structured output": {
        "type": "object",
        "properties": {
            "steps": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "explanation": {"type": "string"},
                        "output": {"type": "string"},
                    },
                    "required": ["explanation", "output"],
                    "additionalProperties": False,
                },
            },
            "final_answer": {"type": "string"},
        },
        "required": ["steps", "final_answer"],
        "additionalProperties": False,
    },
    "draft 7 definitions": {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "definitions": {"when": {"type": "string", "format": "date"}},
        "type": "object",
        "properties": {"when": {"$ref": "#/definitions/when"}},
        "required": ["when"],
    },
}


@pytest.mark.parametrize("schema", SCHEMAS.values(), ids=SCHEMAS.keys())
def test_the_sample_validates_against_its_schema(schema: Any) -> None:
    value = sample(schema)
    validator = jsonschema_rs.validator_for(schema, validate_formats=True)
    errors = [error.message for error in validator.iter_errors(value)]
    assert errors == [], value


def test_enums_take_their_first_value_and_defaults_are_used() -> None:
    value = sample(
        {
            "type": "object",
            "properties": {
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "default": 3},
            },
            "required": ["unit", "days"],
        }
    )
    assert value == {"unit": "celsius", "days": 3}


def test_a_recursive_schema_ends() -> None:
    value = sample(SCHEMAS["recursive"])
    depth = 0
    while value["children"]:
        value, depth = value["children"][0], depth + 1
    assert 1 <= depth <= 8


@pytest.mark.parametrize(
    ("schema", "where"),
    [
        ({"type": "text"}, "'/type'"),
        ({"type": "object", "properties": {"a": {"type": 3}}}, "'/properties/a/type'"),
        ({"type": "object", "properties": []}, "'/properties'"),
        ({"type": "object", "required": "a"}, "'/required'"),
        ({"$ref": "#/$defs/missing"}, "#/$defs/missing"),
        ({"$ref": "https://example.com/schema.json"}, "'/$ref'"),
        ({"enum": []}, "'/enum'"),
        (False, "'/'"),
        ({"type": "object", "properties": {"a": False}, "required": ["a"]}, "'/properties/a'"),
        ({"anyOf": []}, "anyOf"),
        ("a string", "'/'"),
        (
            {"$defs": {"loop": {"$ref": "#/$defs/loop"}}, "$ref": "#/$defs/loop"},
            "refers to itself",
        ),
        (  # every level requires the next: no finite value fits
            {
                "$defs": {
                    "n": {
                        "type": "object",
                        "properties": {"n": {"$ref": "#/$defs/n"}},
                        "required": ["n"],
                    }
                },
                "$ref": "#/$defs/n",
            },
            "nests more than 64 levels",
        ),
    ],
)
def test_a_schema_it_cannot_follow_is_a_schema_error_saying_where(schema: Any, where: str) -> None:
    with pytest.raises(SchemaError) as refused:
        sample(schema)
    assert where in str(refused.value)
