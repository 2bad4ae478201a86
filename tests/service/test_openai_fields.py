"""In-process tests of the OpenAI routes' request fields: nulls, vLLM's extensions, fields
refused by name, inputs a template or tokenizer cannot take."""

from __future__ import annotations

from typing import Any

from service_testing import CHAT, PROMPT


def test_openai_nulls_mean_the_defaults(client: Any) -> None:
    """The openai client sends null for every None argument: as vLLM, null is the default."""
    nulls = dict.fromkeys(("temperature", "top_p", "n", "stream", "presence_penalty",
                           "frequency_penalty", "top_k", "min_p", "logprobs", "seed", "stop",
                           "repetition_penalty", "ignore_eos", "min_tokens"))  # fmt: skip
    for path, body in (("/v1/completions", {"prompt": PROMPT}), ("/v1/chat/completions",
                                                                 {"messages": CHAT})):  # fmt: skip
        r = client.post(path, json={**body, **nulls, "max_tokens": 2})
        assert r.status_code == 200, (path, r.text)
        assert len(r.json()["choices"]) == 1


def test_logit_bias_and_stop_options(client: Any, engine: Any) -> None:
    """logit_bias moves greedy decoding as vLLM's does; include_stop_str_in_output and
    skip_special_tokens reach the engine (they were ignored)."""

    def first(**extra: Any) -> tuple[str, list[int]]:
        body = {"prompt": PROMPT, "max_tokens": 1, "temperature": 0, "logprobs": 1, **extra}
        choice = client.post("/v1/completions", json=body).json()["choices"][0]
        return choice["text"], choice["logprobs"]["tokens"]

    greedy, _ = first()
    (greedy_id,) = engine.tokenizer.encode(greedy, add_special_tokens=False)
    other_id = engine.tokenizer.encode(" London", add_special_tokens=False)[0]
    assert first(logit_bias={str(greedy_id): -100})[0] != greedy
    assert first(logit_bias={str(other_id): 100})[0] == engine.tokenizer.decode([other_id])
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stop": ["."]}
    r = client.post("/v1/completions", json={**body, "include_stop_str_in_output": True})
    assert r.json()["choices"][0]["text"].endswith(".")
    assert not client.post("/v1/completions", json=body).json()["choices"][0]["text"].endswith(".")


def test_a_chat_template_that_raises_is_a_400(client: Any, engine: Any) -> None:
    """Templates refuse some conversations (Gemma, Mistral: no system role): a 400 naming
    the messages, as vLLM, not a 500."""
    from jinja2 import TemplateError

    def strict(messages: list[dict]) -> str:
        raise TemplateError("System role not supported")

    engine.apply_chat_template = strict
    try:
        r = client.post("/v1/chat/completions", json={"messages": CHAT})
    finally:
        del engine.apply_chat_template
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "messages"
    assert "System role not supported" in r.json()["error"]["message"]


def test_lone_surrogates_are_a_400(client: Any) -> None:
    """JSON may escape a lone surrogate ("\\ud800"), which is no Unicode text: a 400 naming
    the field (it was a 500 from the tokenizer), and a 404 that can show the model name."""
    headers = {"Content-Type": "application/json"}
    for path, raw, params in (
        ("/v1/completions", b'{"prompt": "hi \\ud800"}', ("prompt",)),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}',
         ("prompt", "messages")),  # the templated prompt, as for a too long one
    ):  # fmt: skip
        r = client.post(path, content=raw, headers=headers)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] in params, r.text
    raw = b'{"model": "x\\ud800", "messages": [{"role": "user", "content": "hi"}]}'
    r = client.post("/v1/chat/completions", content=raw, headers=headers)
    assert r.status_code == 404 and "x\\ud800" in r.json()["error"]["message"]
