"""guided_grammar over HTTP: vLLM's field on the native and OpenAI routes, and
`structured_outputs: {"grammar": "..."}` on the OpenAI routes; grammars with errors, past
the limits, and settings that could leave no token to sample refused with the field named."""

from typing import Any

import pytest
from service_testing import CHAT, PROMPT

from vllm_runner.sample.grammar_compile import compile_grammar
from vllm_runner.sample.grammar_states import GrammarCursor, GrammarStates

CITY = r"""
root   ::= "{\"city\": \"" name "\", \"people\": " number "}"
name   ::= [A-Z] [a-z]{1,12}
number ::= [1-9] [0-9]{0,7}
"""
SUM = 'root ::= sum\nsum ::= sum "+" num | num\nnum ::= [1-9] [0-9]?'
ANSWER = 'root ::= " "? "The capital is "? city "."\ncity ::= [A-Z] [a-z]{1,15}'


def _sentence(grammar: str, text: str) -> bool:
    compiled = compile_grammar(grammar)
    cursor = GrammarCursor(compiled)
    return cursor.feed(GrammarStates(compiled), text.encode()) and cursor.accepts


@pytest.mark.parametrize("temperature", [0.0, 1.5])
def test_completions_are_sentences_of_guided_grammar(client: Any, temperature: float) -> None:
    body = {"prompt": PROMPT, "max_tokens": 40, "n": 3, "seed": 1, "temperature": temperature,
            "guided_grammar": CITY}  # fmt: skip
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        assert _sentence(CITY, choice["text"]), choice
        assert choice["finish_reason"] == "stop", choice


def test_chat_takes_structured_outputs_grammar(client: Any) -> None:
    """Other kinds left unset (None) or off (False), as a whole StructuredOutputsParams of
    vLLM's sends them, are taken."""
    spec = {"grammar": ANSWER, "regex": None, "json": None, "disable_fallback": False}
    body = {"messages": CHAT, "max_tokens": 20, "temperature": 0, "structured_outputs": spec}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert _sentence(ANSWER, choice["message"]["content"]), choice
    assert choice["finish_reason"] == "stop"


def test_native_route_takes_guided_grammar(client: Any) -> None:
    body = {"prompt": PROMPT, "max_tokens": 20, "temperature": 0, "guided_grammar": ANSWER}
    with client.stream("POST", "/generate", json=body) as r:
        assert r.status_code == 200
        assert _sentence(ANSWER, "".join(r.iter_text()))


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        ({"guided_grammar": ""}, "guided_grammar", "at least 1 character"),
        ({"guided_grammar": ["a"]}, "guided_grammar", "valid string"),
        ({"guided_grammar": "a" * 65_537}, "guided_grammar", "at most 65536 characters"),
        ({"guided_grammar": 'root ::= "a" |\n  [b'}, "guided_grammar", "line 2, column 5: exp"),
        ({"guided_grammar": 'root ::= "a"{2000}'}, "guided_grammar", "a repeat count of at most"),
        ({"guided_grammar": "root ::= x\nx ::= y\ny ::= x"}, "guided_grammar", "derives no text"),
        ({"guided_grammar": SUM, "min_tokens": 2}, "min_tokens", "combined with guided_grammar"),
        ({"guided_grammar": SUM, "ignore_eos": True}, "ignore_eos", "with guided_grammar"),
        (
            {"guided_grammar": SUM, "guided_regex": "a"},
            "guided_regex",
            "guided_regex cannot be combined with guided_grammar",
        ),
        (
            {"structured_outputs": {"grammar": SUM}, "guided_grammar": SUM},
            "guided_grammar",
            "give it or structured_outputs.grammar, not both",
        ),
        (
            {"structured_outputs": {"grammar": SUM, "regex": "a"}},
            "structured_outputs",
            "only one choice list, regex, json schema, grammar or json_object true",
        ),
        (
            {"structured_outputs": {"grammar": SUM}, "response_format": {"type": "json_object"}},
            "structured_outputs",
            "a grammar cannot be combined with JSON mode",
        ),
    ],
)
@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_bad_grammar_requests_are_refused(
    client: Any, route: str, fields: dict, param: str, says: str
) -> None:
    body = {"prompt": PROMPT} if route == "/v1/completions" else {"messages": CHAT}
    r = client.post(route, json={**body, **fields})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and says in error["message"], error
