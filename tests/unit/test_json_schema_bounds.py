"""json_schema's bounds on one request's work: a small schema that expands (optional
properties, one $def used many times, anyOf copies) is refused once its regex passes
MAX_REGEX_CHARS, while it grows, and a schema nested past Python's stack or with a bound past
a float's range is a SchemaError (a 400 on the routes), never a RecursionError."""

import json
import re

import pytest
from pydantic import ValidationError

from vllm_runner import SamplingParams
from vllm_runner.sample.json_schema import MAX_REGEX_CHARS, SchemaError, schema_to_regex
from vllm_runner.serving.protocol import CompletionRequest

TOO_LONG = re.escape(f"compiles to a regex of more than {MAX_REGEX_CHARS} characters (the limit)")


def _doubling(levels: int) -> dict:
    """$defs d0..d{levels}: each an object of two properties that are the next one."""
    two = {"type": "object", "required": ["a", "b"]}
    defs = {f"d{i}": {**two, "properties": {k: {"$ref": f"#/$defs/d{i + 1}"} for k in "ab"}}
            for i in range(levels)}  # fmt: skip
    return {"$defs": {**defs, f"d{levels}": {"type": "integer"}}, "$ref": "#/$defs/d0"}


@pytest.mark.parametrize(
    ("schema", "where"),
    [
        # 120 optional properties: an alternative per first one present, each with the rest
        ({"type": "object", "properties": {f"p{i}": {} for i in range(120)}}, "#"),
        # 2 ** 40 integers' worth of regex from a few hundred characters of schema
        (_doubling(40), "#/$defs/d30"),
        # one large definition written out once per anyOf entry
        (
            {"$defs": {"big": {"type": "object"}}, "anyOf": [{"$ref": "#/$defs/big"}] * 50},
            "#/anyOf",
        ),
        ({"prefixItems": [{"type": "object"}] * 50}, "#/prefixItems"),
    ],
)
def test_a_regex_past_the_limit_is_refused_as_it_grows(schema: dict, where: str) -> None:
    with pytest.raises(SchemaError, match=TOO_LONG) as info:
        schema_to_regex(schema)
    assert str(info.value).startswith(f"the schema at {where} compiles"), info.value
    with pytest.raises(ValueError, match=f"guided_json: .*{TOO_LONG}"):
        SamplingParams(guided_json=schema)


def test_a_regex_within_the_limit_still_compiles() -> None:
    assert len(schema_to_regex(_doubling(3))) < MAX_REGEX_CHARS
    assert SamplingParams(guided_json=_doubling(3)).guided_pattern == schema_to_regex(_doubling(3))


def _nested(depth: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


@pytest.mark.parametrize(
    "schema",
    [_nested(400), {"prefixItems": [{"type": "null"}] * 1200}],
)
def test_a_schema_past_the_stack_is_a_schema_error(schema: dict) -> None:
    with pytest.raises(SchemaError, match="nests too deeply to compile"):
        schema_to_regex(schema)
    with pytest.raises(ValidationError, match="guided_json: .*nests too deeply"):
        CompletionRequest(prompt="x", guided_json=schema)  # (a 400, not a 500)


def test_json_text_nested_past_the_stack_is_refused_naming_guided_json() -> None:
    with pytest.raises(ValueError, match="guided_json: not JSON text of a schema"):
        SamplingParams(guided_json="[" * 5000)
    with pytest.raises(ValidationError, match="guided_json: not JSON text"):
        CompletionRequest(prompt="x", guided_json="[" * 5000)


@pytest.mark.parametrize("key", ["minimum", "exclusiveMaximum"])
def test_a_bound_past_a_floats_range_is_refused(key: str) -> None:
    schema = {"type": "integer", key: 10**400}
    with pytest.raises(SchemaError) as info:
        schema_to_regex(schema)
    assert str(info.value) == (
        f"{key!r} at #/{key}: must be a finite number within a float's range, not an integer "
        "of 401 digits"
    )
    assert json.loads(json.dumps(schema)) == schema  # (JSON holds it: a client can send it)
