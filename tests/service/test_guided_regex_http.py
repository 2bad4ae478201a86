"""guided_regex over HTTP: vLLM's field on the native and OpenAI routes, and
`structured_outputs: {"regex": "..."}` on the OpenAI routes; patterns outside the subset,
past the limits, and settings that could leave no token to sample refused with the field
named."""

import re
from typing import Any

import pytest
from service_testing import CHAT, PROMPT

PHONE = r"[0-9]{3}-[0-9]{4}"
JSON_LIKE = r'\{"city": "[A-Z][a-z]{1,12}", "people": [1-9][0-9]{0,7}\}'


@pytest.mark.parametrize("temperature", [0.0, 1.5])
def test_completions_fully_match_guided_regex(client: Any, temperature: float) -> None:
    body = {"prompt": PROMPT, "max_tokens": 40, "n": 3, "seed": 1, "temperature": temperature,
            "guided_regex": JSON_LIKE}  # fmt: skip
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        assert re.fullmatch(JSON_LIKE, choice["text"]), choice
        assert choice["finish_reason"] == "stop", choice


def test_chat_takes_structured_outputs_regex(client: Any) -> None:
    """Other kinds left unset (None) or off (False), as a whole StructuredOutputsParams of
    vLLM's sends them, are taken."""
    spec = {"regex": PHONE, "choice": None, "json": None, "disable_fallback": False}
    body = {"messages": CHAT, "max_tokens": 20, "temperature": 0, "structured_outputs": spec}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert re.fullmatch(PHONE, choice["message"]["content"]), choice
    assert choice["finish_reason"] == "stop"


def test_native_route_takes_guided_regex(client: Any) -> None:
    body = {"prompt": PROMPT, "max_tokens": 20, "temperature": 0, "guided_regex": PHONE}
    with client.stream("POST", "/generate", json=body) as r:
        assert r.status_code == 200
        assert re.fullmatch(PHONE, "".join(r.iter_text()))


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        ({"guided_regex": ""}, "guided_regex", "at least 1 character"),
        ({"guided_regex": ["a"]}, "guided_regex", "valid string"),
        ({"guided_regex": "a" * 65_537}, "guided_regex", "at most 65536 characters"),
        ({"guided_regex": "a+?"}, "guided_regex", "a lazy quantifier '+?' is not supported at"),
        ({"guided_regex": "(?P<x>a)"}, "guided_regex", "a named group is not supported"),
        ({"guided_regex": "(a|b)*a(a|b){14}"}, "guided_regex", "more than 10000 DFA states"),
        ({"guided_regex": "a", "min_tokens": 2}, "min_tokens", "combined with guided_regex"),
        ({"guided_regex": "a", "ignore_eos": True}, "ignore_eos", "combined with guided_regex"),
        ({"guided_regex": "a", "bad_words": ["x"]}, "bad_words", "combined with guided_regex"),
        (
            {"guided_regex": "a", "allowed_token_ids": [5]},
            "allowed_token_ids",
            "combined with guided_regex",
        ),
        (
            {"guided_regex": "a", "guided_choice": ["a"]},
            "guided_choice",
            "guided_choice cannot be combined with guided_regex",
        ),
        (
            {"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
            "structured_outputs",
            "a regex cannot be combined with JSON mode",
        ),
        (
            {"guided_regex": "a", "response_format": {"type": "json_object"}},
            "json_object",
            "json_object cannot be combined with guided_regex",
        ),
        (
            {"structured_outputs": {"regex": "a"}, "guided_regex": "b"},
            "guided_regex",
            "give it or structured_outputs.regex, not both",
        ),
        (
            {"structured_outputs": {"regex": "a", "choice": ["a"]}},
            "structured_outputs",
            "only one choice list, regex, json schema, grammar or json_object true",
        ),
        (
            {"structured_outputs": {"grammar": "x"}},
            "guided_grammar",
            "line 1, column 2: expected '::=' after the rule name 'x'",
        ),
    ],
)
@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_bad_regex_requests_are_refused(
    client: Any, route: str, fields: dict, param: str, says: str
) -> None:
    body = {"prompt": PROMPT} if route == "/v1/completions" else {"messages": CHAT}
    r = client.post(route, json={**body, **fields})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and says in error["message"], error
