"""guided_json: a JSON schema compiled to the regex the engine's masks follow
(``SamplingParams.guided_pattern``), and the OpenAI routes' names for it (``response_format``
json_schema, ``structured_outputs.json``); what it refuses, each with the field named."""

import json

import pytest

from vllm_runner import SamplingParams
from vllm_runner.sample.json_schema import schema_to_regex
from vllm_runner.serving.protocol import CompletionRequest
from vllm_runner.serving.structured_outputs import json_mode, structured_choice

PERSON = {"type": "object", "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 20},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150}}}  # fmt: skip


def test_the_schema_becomes_the_pattern_the_masks_follow() -> None:
    want = schema_to_regex(PERSON)
    assert SamplingParams(guided_json=PERSON).guided_pattern == want
    assert SamplingParams(guided_json=json.dumps(PERSON)).guided_pattern == want  # JSON text
    assert SamplingParams(guided_regex="a|b").guided_pattern == "a|b"
    assert SamplingParams().guided_pattern is None


def test_properties_keep_the_schemas_order() -> None:
    swapped = {**PERSON, "properties": dict(reversed(PERSON["properties"].items()))}
    a = SamplingParams(guided_json=PERSON).guided_pattern
    b = SamplingParams(guided_json=swapped).guided_pattern
    assert a.index('"name"') < a.index('"age"') and b.index('"age"') < b.index('"name"')


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"guided_json": "{bad"}, r"guided_json: not JSON text of a schema \(Expecting"),
        (
            {"guided_json": 5},
            r"guided_json must be a JSON schema \(an object, or its JSON "
            r"text\), got 5",
        ),  # fmt: skip
        (
            {"guided_json": {"type": "object", "uniqueItems": True}},
            "guided_json: 'uniqueItems' at #/uniqueItems",
        ),  # fmt: skip
        (
            {"guided_json": {"type": "string", "maxLength": 10001}},
            "guided_json: 'maxLength' at #/maxLength: 10001 is above 10000 \\(the limit\\)",
        ),  # fmt: skip
        ({"guided_json": {"type": "number", "minimum": float("nan")}}, "guided_json: "),
        (
            {"guided_json": PERSON, "guided_regex": "a"},
            "guided_regex cannot be combined with guided_json, got 'a'",
        ),  # fmt: skip
        (
            {"guided_json": PERSON, "min_tokens": 2},
            "min_tokens cannot be combined with guided_json, got 2",
        ),  # fmt: skip
        ({"guided_json": PERSON, "ignore_eos": True}, "ignore_eos cannot be combined"),
        ({"guided_json": PERSON, "json_object": True}, "json_object cannot be combined"),
        ({"guided_json": PERSON, "guided_choice": ["a"]}, "guided_choice cannot be combined"),
        ({"guided_json": PERSON, "bad_words": ["x"]}, "bad_words cannot be combined"),
        ({"guided_json": PERSON, "allowed_token_ids": [1]}, "allowed_token_ids cannot be"),
    ],
)
def test_refusals_name_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_response_format_json_schema_is_guided_json() -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                  "strict": True, "description": None}}  # fmt: skip
    assert json_mode({"response_format": fmt, "n": 2}) == {"n": 2, "guided_json": PERSON}
    assert json_mode({"response_format": {"type": "json_object"}}) == {"json_object": True}
    text = {"response_format": {"type": "text"}}
    assert json_mode(text) == text  # (left to the unsupported-fields check)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            'response_format: a json_schema format is {"type": "json_schema", "json_schema": '
            '{"name": ..., "schema": {...}}}, got',
        ),  # fmt: skip
        (
            {"response_format": {"type": "json_schema", "schema": PERSON}},
            "response_format: a json_schema format is",
        ),  # fmt: skip
        (
            {
                "response_format": {"type": "json_schema", "json_schema": {"schema": PERSON}},
                "guided_json": PERSON,
            },
            "guided_json: give it or response_format json_schema, not both",
        ),  # fmt: skip
        (
            {
                "response_format": {"type": "json_schema", "json_schema": {"schema": PERSON}},
                "structured_outputs": {"regex": "a"},
            },
            "structured_outputs cannot be combined with response_format json_schema",
        ),  # fmt: skip
    ],
)
def test_response_format_refusals(data: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        json_mode(data)
    assert str(info.value).startswith(message), info.value


def test_structured_outputs_json_is_guided_json() -> None:
    spec = {"json": PERSON, "regex": None, "choice": None, "json_object": False}
    assert structured_choice({"structured_outputs": spec}) == {"guided_json": PERSON}
    with pytest.raises(ValueError, match="guided_json: give it or structured_outputs.json"):
        structured_choice({"structured_outputs": {"json": PERSON}, "guided_json": PERSON})


def test_a_route_bounds_the_schemas_size() -> None:
    big = {"type": "object", "description": "x" * 70_000}
    with pytest.raises(ValueError, match="at most 65536 characters as JSON, got 70037"):
        CompletionRequest(prompt="x", guided_json=big)
    assert CompletionRequest(prompt="x", guided_json=PERSON).sampling_params().guided_pattern
