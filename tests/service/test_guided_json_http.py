"""JSON schemas over HTTP: OpenAI's `response_format: {"type": "json_schema", ...}`, vLLM's
`structured_outputs: {"json": ...}` and `guided_json`; schemas the compiler does not take and
conflicting kinds refused with the field named."""

import json
from typing import Any

import pytest
from service_testing import CHAT, PROMPT

CITY = {"type": "object", "additionalProperties": False, "required": ["city", "country"],
        "properties": {"city": {"type": "string", "maxLength": 30},
                       "country": {"type": "string", "maxLength": 30},
                       "population": {"type": "integer", "minimum": 0}}}  # fmt: skip


def _check(text: str) -> None:
    doc = json.loads(text)
    assert {"city", "country"} <= set(doc) <= set(CITY["properties"]), doc
    assert all(isinstance(doc[k], str) and len(doc[k]) <= 30 for k in ("city", "country"))
    assert type(doc.get("population", 0)) is int and doc.get("population", 0) >= 0


def test_chat_takes_response_format_json_schema(client: Any) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
    body = {"messages": CHAT, "max_tokens": 80, "temperature": 0, "response_format": fmt}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    _check(choice["message"]["content"])


@pytest.mark.parametrize("fields", [{"structured_outputs": {"json": CITY}},
                                    {"guided_json": json.dumps(CITY)}])  # fmt: skip
def test_completions_take_structured_outputs_json_and_guided_json(client, fields) -> None:
    body = {"prompt": PROMPT, "max_tokens": 80, "n": 2, "seed": 0, "temperature": 1.0, **fields}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        assert choice["finish_reason"] == "stop", choice
        _check(choice["text"])


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        (
            {"guided_json": {"type": "object", "patternProperties": {}}},
            "guided_json",
            "'patternProperties' at #/patternProperties",
        ),  # fmt: skip
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format",
            "a json_schema format is",
        ),  # fmt: skip
        (
            {
                "response_format": {"type": "json_schema", "json_schema": {"schema": CITY}},
                "guided_json": CITY,
            },
            "guided_json",
            "give it or response_format",
        ),  # fmt: skip
        (
            {"structured_outputs": {"json": CITY}, "min_tokens": 3},
            "min_tokens",
            "min_tokens cannot be combined with guided_json",
        ),  # fmt: skip
    ],
)
def test_refusals_name_the_field(client: Any, fields: dict, param: str, says: str) -> None:
    r = client.post("/v1/chat/completions", json={"messages": CHAT, **fields})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and says in error["message"], error
