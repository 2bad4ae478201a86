"""guided_choice over HTTP: vLLM's field on the native and OpenAI routes, and
`structured_outputs: {"choice": [...]}` on the OpenAI routes; bad lists and other kinds of
structured output refused with the field named."""

from typing import Any

import pytest
from service_testing import CHAT, PROMPT

CHOICES = [" Paris", " London", " the city of Berlin"]
CHAT_CHOICES = ["Paris", "London", "Rome"]


@pytest.mark.parametrize("temperature", [0.0, 1.5])
def test_completions_answer_one_of_the_choices(client: Any, temperature: float) -> None:
    body = {"prompt": PROMPT, "max_tokens": 20, "n": 6, "seed": 1, "temperature": temperature,
            "guided_choice": CHOICES}  # fmt: skip
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        assert choice["text"] in CHOICES and choice["finish_reason"] == "stop", choice


def test_chat_takes_structured_outputs_choice(client: Any) -> None:
    """Other kinds left unset (None) or off (False), as a whole StructuredOutputsParams of
    vLLM's sends them, are taken."""
    spec = {"choice": CHAT_CHOICES, "json": None, "disable_fallback": False}
    body = {"messages": CHAT, "max_tokens": 20, "temperature": 0, "structured_outputs": spec}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] in CHAT_CHOICES and choice["finish_reason"] == "stop"


def test_chat_streams_a_choice(client: Any) -> None:
    body = {"messages": CHAT, "max_tokens": 20, "temperature": 0, "stream": True,
            "guided_choice": CHAT_CHOICES}  # fmt: skip
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        text = "".join(
            chunk["choices"][0]["delta"].get("content") or ""
            for chunk in _events(r.iter_lines())
            if chunk["choices"]
        )
    assert text in CHAT_CHOICES


def _events(lines) -> list[dict]:
    import json

    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


def test_native_routes_take_guided_choice(client: Any) -> None:
    body = {"prompt": PROMPT, "max_tokens": 20, "temperature": 0, "guided_choice": CHOICES}
    with client.stream("POST", "/generate", json=body) as r:
        assert r.status_code == 200
        assert "".join(r.iter_text()) in CHOICES
    r = client.post("/complete", json={"requests": [body, {**body, "guided_choice": [" Rome"]}]})
    assert r.status_code == 200, r.text
    results = r.json()["results"] if isinstance(r.json(), dict) else r.json()
    assert results[0]["text"] in CHOICES and results[1]["text"] == " Rome"


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        ({"guided_choice": []}, "guided_choice", "at least 1"),
        ({"guided_choice": [""]}, "guided_choice", "at least 1 character"),
        ({"guided_choice": "Paris"}, "guided_choice", "valid list"),
        ({"guided_choice": ["x"] * 65}, "guided_choice", "at most 64 entries"),
        ({"guided_choice": ["x"], "min_tokens": 2}, "guided_choice", "combined with min_tokens"),
        ({"guided_choice": ["x"], "ignore_eos": True}, "guided_choice", "with ignore_eos"),
        # a choice the output would end inside: its stop string, stop token id (",": 28), EOS
        ({"guided_choice": [" Paris, France"], "stop": [","]}, "guided_choice", "stop string ','"),
        (
            {"guided_choice": [" Paris, France"], "stop_token_ids": [28]},
            "guided_choice",
            "' Paris, France' holds the end token 28",
        ),
        ({"guided_choice": ["yes<|im_end|>"]}, "guided_choice", "holds the end token 2"),
        ({"structured_outputs": {"grammar": "root ::= x"}}, "guided_grammar", "rule 'x' is not"),
        ({"structured_outputs": {"choice": ["a"], "regex": "a+"}}, "structured_outputs", "regex"),
        ({"structured_outputs": ["a"]}, "structured_outputs", "an object"),
        (
            {"structured_outputs": {"choice": ["a"]}, "guided_choice": ["b"]},
            "guided_choice",
            "not both",
        ),
    ],
)
def test_bad_choices_are_refused(client: Any, fields: dict, param: str, says: str) -> None:
    r = client.post("/v1/completions", json={"prompt": PROMPT, **fields})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and says in error["message"], error
