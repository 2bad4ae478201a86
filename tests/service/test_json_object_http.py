"""JSON mode over HTTP: OpenAI's `response_format: {"type": "json_object"}` and vLLM's
`structured_outputs: {"json_object": true}` on both OpenAI routes; other formats and
settings that could leave no token to sample refused with the field named."""

import json
from typing import Any

import pytest
from service_testing import PROMPT

ASK = [{"role": "user", "content": "Describe a cat as a JSON object with a name and an age."}]


def test_chat_answers_one_json_object(client: Any) -> None:
    body = {"messages": ASK, "max_tokens": 200, "temperature": 0,
            "response_format": {"type": "json_object", "json_schema": None}}  # fmt: skip
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    assert isinstance(json.loads(choice["message"]["content"]), dict)


def test_completions_take_structured_outputs_json_object(client: Any) -> None:
    body = {"prompt": PROMPT, "max_tokens": 200, "temperature": 0,
            "structured_outputs": {"json_object": True, "choice": None}}  # fmt: skip
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    from vllm_runner.sample.json_grammar import is_json_prefix

    assert is_json_prefix(choice["text"].encode()) and choice["text"].lstrip()[:1] == "{"
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(choice["text"]), dict)


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format",
            "a json_schema format is",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format", "not supported"),
        (
            {"structured_outputs": {"json_object": True, "choice": ["a"]}},
            "structured_outputs",
            "only one choice list, regex, json schema, grammar or json_object",
        ),
        (
            {"structured_outputs": {"grammar": "root ::= x"}},
            "guided_grammar",
            "line 1, column 10: rule 'x' is not defined",
        ),
        (  # the choice list's field, not guided_choice (not sent)
            {"response_format": {"type": "json_object"}, "structured_outputs": {"choice": ["a"]}},
            "structured_outputs",
            "a choice list cannot be combined with JSON mode",
        ),
        (
            {"response_format": {"type": "json_object"}, "min_tokens": 2},
            "min_tokens",
            "min_tokens cannot be combined with json_object",
        ),
        (
            {"response_format": {"type": "json_object"}, "ignore_eos": True},
            "ignore_eos",
            "ignore_eos cannot be combined with json_object",
        ),
        (
            {"response_format": {"type": "json_object"}, "guided_choice": ["a"]},
            "guided_choice",
            "guided_choice cannot be combined with json_object",
        ),
        (
            {"structured_outputs": {"json_object": True}, "bad_words": ["x"]},
            "bad_words",
            "bad_words cannot be combined with json_object",
        ),
        (
            {"response_format": {"type": "json_object"}, "allowed_token_ids": [5]},
            "allowed_token_ids",
            "allowed_token_ids cannot be combined with json_object",
        ),
    ],
)
@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_bad_json_requests_are_refused(
    client: Any, route: str, fields: dict, param: str, says: str
) -> None:
    body = {"prompt": PROMPT} if route == "/v1/completions" else {"messages": ASK}
    r = client.post(route, json={**body, **fields})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and says in error["message"], error
