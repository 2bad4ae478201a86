"""truncate_prompt_tokens and allowed_token_ids on every generating route (vLLM's fields)."""

from __future__ import annotations

from typing import Any

from service_testing import CHAT, MAX_MODEL_LEN, PROMPT

GREEDY = {"max_tokens": 4, "temperature": 0}


def test_truncate_prompt_tokens_on_every_route(client: Any, engine: Any) -> None:
    """The prompt's last k ids are used and counted; for chat, the templated prompt's."""
    tail = engine.tokenizer.encode(PROMPT)[-3:]
    want = client.post("/v1/completions", json={"prompt": tail, **GREEDY}).json()
    body = {"prompt": PROMPT, "truncate_prompt_tokens": 3, **GREEDY}
    got = client.post("/v1/completions", json=body).json()
    assert (
        got["usage"]["prompt_tokens"] == 3
        and got["choices"][0]["text"] == want["choices"][0]["text"]
    )
    chat = client.post(
        "/v1/chat/completions", json={"messages": CHAT, "truncate_prompt_tokens": 5, **GREEDY}
    )
    assert chat.status_code == 200 and chat.json()["usage"]["prompt_tokens"] == 5, chat.text
    r = client.post("/complete", json={"requests": [body]})
    assert r.status_code == 200, r.text
    assert r.json()[0]["prompt_tokens"] == 3 and r.json()[0]["text"] == want["choices"][0]["text"]
    r = client.post("/generate", json=body)
    assert r.status_code == 200 and r.text == want["choices"][0]["text"], r.text
    for path, base in (
        ("/v1/completions", {"prompt": PROMPT}),
        ("/v1/chat/completions", {"messages": CHAT}),
    ):
        r = client.post(path, json={**base, "truncate_prompt_tokens": MAX_MODEL_LEN + 1})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "truncate_prompt_tokens", error
        assert (
            f"{MAX_MODEL_LEN + 1}" in error["message"] and f"({MAX_MODEL_LEN})" in error["message"]
        )
    r = client.post("/generate", json={"prompt": PROMPT, "truncate_prompt_tokens": 0})
    assert r.status_code == 400 and "truncate_prompt_tokens" in r.text, r.text


def test_allowed_token_ids_on_every_route(client: Any, engine: Any) -> None:
    (only,) = engine.tokenizer.encode(" London", add_special_tokens=False)[:1]
    text = engine.tokenizer.decode([only] * 4)
    body = {"prompt": PROMPT, "allowed_token_ids": [only], **GREEDY}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == text, r.text
    r = client.post(
        "/v1/chat/completions", json={"messages": CHAT, "allowed_token_ids": [only], **GREEDY}
    )
    assert r.json()["choices"][0]["message"]["content"] == text, r.text
    assert client.post("/complete", json={"requests": [body]}).json()[0]["text"] == text
    assert client.post("/generate", json=body).text == text


def test_allowed_token_ids_limits(client: Any, engine: Any) -> None:
    """At most 1000 ids (each step builds every row's mask from them), each in the vocabulary,
    at least one."""
    vocab = engine.inputs.limits.vocab_size
    for ids, named in ((list(range(1001)), ("1000", "1001")), ([5, vocab], (str(vocab), "outside")),
                       ([], ("allowed_token_ids",))):  # fmt: skip
        for path in ("/v1/completions", "/generate"):
            r = client.post(path, json={"prompt": PROMPT, "allowed_token_ids": ids})
            assert r.status_code == 400, (path, r.text[:300])
            assert all(n in r.text for n in named) and len(r.text) < 2_000, r.text[:300]
            if path == "/v1/completions":
                assert r.json()["error"]["param"] == "allowed_token_ids", r.text
    r = client.post(
        "/v1/completions", json={"prompt": PROMPT, "allowed_token_ids": list(range(1000)), **GREEDY}
    )
    assert r.status_code == 200, r.text[:300]


def test_allowed_token_ids_that_min_tokens_bans_are_refused(client: Any, engine: Any) -> None:
    """Only stop / EOS ids allowed while min_tokens bans them: a 400 naming the fields (token
    0, outside the allowed set, was sampled)."""
    eos = engine.tokenizer.eos_token_id
    for body in ({"allowed_token_ids": [42], "stop_token_ids": [42]}, {"allowed_token_ids": [eos]}):
        body = {"prompt": PROMPT, "min_tokens": 2, **GREEDY, **body}
        for path in ("/v1/completions", "/generate"):
            r = client.post(path, json=body)
            assert r.status_code == 400, (path, r.text[:300])
            assert "allowed_token_ids" in r.text and "min_tokens (2)" in r.text, r.text
            if path == "/v1/completions":
                assert r.json()["error"]["param"] == "allowed_token_ids", r.text
        r = client.post("/complete", json={"requests": [body]})
        assert r.status_code == 400 and "min_tokens (2)" in r.text, r.text[:300]


def test_a_text_too_long_to_fit_is_served_when_truncated(client: Any, engine: Any) -> None:
    """As vLLM: with truncate_prompt_tokens, a text longer than max_model_len tokens could
    be spelled in is tokenized whole and cut, on each route (not refused by its length)."""
    text = "the lazy dog " * (engine.inputs.max_prompt_chars // 13 + 10)
    tail = engine.tokenizer.encode(text)[-3:]
    want = client.post("/v1/completions", json={"prompt": tail, **GREEDY}).json()
    body = {"prompt": text, "truncate_prompt_tokens": 3, **GREEDY}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 3, r.text[:300]
    assert r.json()["choices"][0]["text"] == want["choices"][0]["text"]
    r = client.post("/complete", json={"requests": [body]})
    assert r.status_code == 200 and r.json()[0]["prompt_tokens"] == 3, r.text[:300]
    r = client.post("/generate", json=body)
    assert r.status_code == 200 and r.text == want["choices"][0]["text"], r.text[:300]
