"""The model's sampling defaults (generation_config.json) on the HTTP routes: a field the
client did not send takes the model's default, one it sent wins (even at the built-in
value); a request without max_tokens is capped by the model's max_new_tokens, as vLLM's
server. The served engine is given such defaults here (the default model has none)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from service_testing import CHAT, MAX_MODEL_LEN, PROMPT

DEFAULTS = {"temperature": 0.0, "top_k": 20, "repetition_penalty": 1.05, "max_tokens": 5}


@pytest.fixture
def model_defaults(engine: Any, monkeypatch: Any) -> Any:
    """``set(defaults)`` gives the engine those sampling defaults; returns the list the
    SamplingParams of each request the engine gets are recorded in."""
    seen: list[Any] = []
    run = engine._run

    def recording_run(prompt: Any, params: Any, *rest: Any) -> Any:  # (id, priority, adapter)
        seen.append(params)
        return run(prompt, params, *rest)

    def give(defaults: dict[str, Any]) -> list[Any]:
        limits = dataclasses.replace(engine.inputs.limits, sampling_defaults=defaults)
        monkeypatch.setattr(engine.inputs, "limits", limits)
        return seen

    monkeypatch.setattr(engine, "_run", recording_run)
    return give


def _sampled(seen: list[Any]) -> tuple:
    p = seen.pop()
    assert not seen
    return p.temperature, p.top_k, p.top_p, p.repetition_penalty, p.max_tokens


def test_openai_fields_not_sent_take_the_models_defaults(client: Any, model_defaults: Any):
    seen = model_defaults(DEFAULTS)
    r = client.post("/v1/completions", json={"prompt": PROMPT})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 5
    # max_tokens left out: completions' 16, capped by the model's 5
    assert _sampled(seen) == (0.0, 20, 1.0, 1.05, 5)
    # sent, even at the built-in values: the client's
    sent = {"temperature": 1.0, "top_k": 0, "repetition_penalty": 1.0, "max_tokens": 16}
    assert client.post("/v1/completions", json={"prompt": PROMPT, **sent}).status_code == 200
    assert _sampled(seen) == (1.0, 0, 1.0, 1.0, 16)
    # null (what the openai client sends for None) is not sent; max_tokens null: up to
    # max_model_len, capped by the model's
    nulls = {"temperature": None, "top_k": None, "max_tokens": None}
    assert client.post("/v1/completions", json={"prompt": PROMPT, **nulls}).status_code == 200
    assert _sampled(seen) == (0.0, 20, 1.0, 1.05, 5)
    for body in ({"messages": CHAT}, {"messages": CHAT, "stream": True}):
        assert client.post("/v1/chat/completions", json=body).status_code == 200
        assert _sampled(seen) == (0.0, 20, 1.0, 1.05, 5)
    body = {"messages": CHAT, "max_completion_tokens": 7, "temperature": 0.5}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    assert _sampled(seen) == (0.5, 20, 1.0, 1.05, 7)


def test_the_models_max_tokens_never_makes_a_request_too_long(
    client: Any, engine: Any, model_defaults: Any
):
    """A max_new_tokens past what max_model_len leaves: a request without max_tokens stops
    at max_model_len (the smaller, as vLLM), not a 400; a client's min_tokens above the
    model's cap wins over it (not a 400 either)."""
    seen = model_defaults({"max_tokens": 10 * MAX_MODEL_LEN})
    short = {"stop": [" ", "\n", "."]}  # (the test needs the request's params, not its text)
    r = client.post("/v1/chat/completions", json={"messages": CHAT, **short})
    assert r.status_code == 200, r.text
    prompt_tokens = r.json()["usage"]["prompt_tokens"]
    assert seen.pop().max_tokens == MAX_MODEL_LEN - prompt_tokens
    r = client.post(
        "/v1/completions", json={"prompt": [[1, 2], [1, 2, 3]], "max_tokens": None, **short}
    )
    assert r.status_code == 200, r.text
    assert sorted(p.max_tokens for p in seen) == [MAX_MODEL_LEN - 3, MAX_MODEL_LEN - 2]
    seen.clear()
    model_defaults({"max_tokens": 5})
    body = {"prompt": PROMPT, "min_tokens": 8, "ignore_eos": True}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert seen.pop().max_tokens == 16 and r.json()["usage"]["completion_tokens"] == 16
    r = client.post("/v1/chat/completions", json={"messages": CHAT, **body})
    assert r.status_code == 200, r.text
    assert seen.pop().max_tokens == 8


def test_native_fields_not_sent_take_the_models_defaults(client: Any, model_defaults: Any):
    seen = model_defaults(DEFAULTS)
    r = client.post("/generate", json={"prompt": PROMPT})
    assert r.status_code == 200, r.text
    assert _sampled(seen) == (0.0, 20, 1.0, 1.05, 5)
    r = client.post("/generate", json={"prompt": PROMPT, "temperature": 1.0, "max_tokens": 9})
    assert r.status_code == 200, r.text
    assert _sampled(seen) == (1.0, 20, 1.0, 1.05, 9)
    body = {"requests": [{"prompt": PROMPT}, {"prompt": PROMPT, "top_k": 0, "max_tokens": None}]}
    r = client.post("/complete", json=body)
    assert r.status_code == 200, r.text
    assert [x["completion_tokens"] <= 5 for x in r.json()] == [True, True]
    assert sorted(_sampled([p]) for p in seen) == [(0.0, 0, 1.0, 1.05, 5), (0.0, 20, 1.0, 1.05, 5)]


def test_a_request_without_max_tokens_is_checked_as_capped(
    client: Any, engine: Any, model_defaults: Any, monkeypatch: Any
):
    """A KV cache smaller than max_model_len (8 blocks of 16 tokens here, for 256): a request
    up to max_model_len is capped by the model's max_new_tokens and checked as capped (it was
    checked as if it could run to max_model_len: a 400, "lower max_tokens", on each route)."""
    from vllm_runner.serving import batched

    seen = model_defaults({"max_tokens": 5})
    limits = dataclasses.replace(engine.inputs.limits, num_blocks=8)
    monkeypatch.setattr(engine.inputs, "limits", limits)
    for path, body in (
        ("/v1/chat/completions", {"messages": CHAT}),
        ("/v1/chat/completions", {"messages": CHAT, "stream": True}),
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": None}),
        ("/generate", {"prompt": PROMPT, "max_tokens": None}),
        ("/complete", {"requests": [{"prompt": PROMPT, "max_tokens": None}]}),
    ):
        r = client.post(path, json=body)
        assert r.status_code == 200, (path, r.text)
        assert seen.pop().max_tokens == 5 and not seen
    monkeypatch.setattr(batched, "PARSE_TIME_CHARS", 4)  # (tokenized in /complete's handler)
    r = client.post("/complete", json={"requests": [{"prompt": PROMPT, "max_tokens": None}]})
    assert r.status_code == 200 and r.json()[0]["error"] is None, r.text
    assert seen.pop().max_tokens == 5 and not seen
    # the cap never stands in for a prompt too long (named as such)
    r = client.post("/v1/completions", json={"prompt": [1] * MAX_MODEL_LEN, "max_tokens": None})
    assert r.status_code == 400 and f"prompt has {MAX_MODEL_LEN} tokens" in r.text, r.text
