"""vLLM's /tokenize, /detokenize, /health and /version routes, in process (the default model)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from service_testing import CHAT, MAX_MODEL_LEN, PROMPT

PROMPT_IDS = [504, 3575, 282, 4649, 314]  # PROMPT's ids with the default model's tokenizer


def test_tokenize_a_prompt_as_the_completions_route_counts_it(client: Any, engine: Any) -> None:
    assert engine.tokenizer.encode(PROMPT) == PROMPT_IDS
    r = client.post("/tokenize", json={"prompt": PROMPT, "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == PROMPT_IDS and body["count"] == 5
    assert body["max_model_len"] == MAX_MODEL_LEN
    assert "".join(body["token_strs"]).replace("Ġ", " ") == PROMPT
    usage = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1}).json()
    assert usage["usage"]["prompt_tokens"] == body["count"]
    plain = client.post("/tokenize", json={"prompt": PROMPT, "add_special_tokens": False})
    assert plain.json()["tokens"] == PROMPT_IDS and plain.json()["token_strs"] is None


def test_tokenize_adds_special_tokens_to_a_prompt_by_default(client: Any, engine: Any) -> None:
    """As vLLM's: the prompt form adds them unless add_special_tokens is false, as the
    completions route tokenizes the prompt (they were left out: Llama's BOS was not counted);
    the messages form adds none unless asked (the template holds them)."""
    encode = engine.tokenizer.encode

    def special(path: str, body: dict) -> bool:
        seen: list[bool] = []
        engine.tokenizer.encode = lambda *a, **k: (
            seen.append(k["add_special_tokens"]) or encode(*a, **k)
        )
        try:
            assert client.post(path, json=body).status_code == 200
        finally:
            del engine.tokenizer.encode
        return seen[0]

    assert special("/v1/completions", {"prompt": PROMPT, "max_tokens": 1})
    assert special("/tokenize", {"prompt": PROMPT})
    assert not special("/tokenize", {"prompt": PROMPT, "add_special_tokens": False})
    assert not special("/tokenize", {"messages": CHAT})


def test_tokenize_messages_gives_the_chat_routes_prompt(client: Any) -> None:
    """The messages form renders the chat template, as the chat route does: the same ids
    (its usage counts them), and without the generation prompt fewer of them."""
    body = client.post("/tokenize", json={"messages": CHAT}).json()
    chat = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 1}).json()
    assert body["count"] == chat["usage"]["prompt_tokens"] == len(body["tokens"])
    bare = client.post("/tokenize", json={"messages": CHAT, "add_generation_prompt": False})
    assert bare.json()["tokens"] == body["tokens"][: bare.json()["count"]]
    assert bare.json()["count"] < body["count"]


def test_tokenize_counts_a_prompt_past_max_model_len(client: Any) -> None:
    """As vLLM's: counting tokens is what a client asks before cutting a prompt to fit."""
    r = client.post("/tokenize", json={"prompt": " Paris" * (MAX_MODEL_LEN + 10)})
    assert r.status_code == 200, r.text
    assert r.json()["count"] > MAX_MODEL_LEN


def test_detokenize_gives_the_text_back(client: Any) -> None:
    r = client.post("/detokenize", json={"tokens": PROMPT_IDS})
    assert r.status_code == 200 and r.json() == {"prompt": PROMPT}
    assert client.post("/detokenize", json={"tokens": []}).json() == {"prompt": ""}


@pytest.mark.parametrize(
    "path, body, param, message",
    [
        ("/tokenize", {}, None, "send either prompt or messages, got neither"),
        ("/tokenize", {"prompt": "a", "messages": CHAT}, None, "got both"),
        ("/tokenize", {"prompt": ""}, "prompt", "prompt is empty"),
        ("/tokenize", {"messages": CHAT, "continue_final_message": True}, "continue_final_message",
         "continue_final_message needs add_generation_prompt: false"),
        ("/detokenize", {"tokens": [504, 49152]}, "tokens",
         r"id 49152 is not in the vocabulary \(ids < 49152\)"),
        ("/detokenize", {"tokens": [-1]}, "tokens", "greater than or equal to 0"),
        ("/detokenize", {"tokens": "504"}, "tokens", "valid list"),
    ],
)  # fmt: skip
def test_bad_input_is_a_400_naming_it(client: Any, path, body, param, message) -> None:
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param
    assert re.search(message, error["message"]), error["message"]


def test_another_model_is_a_404(client: Any) -> None:
    for path, body in (("/tokenize", {"prompt": PROMPT}), ("/detokenize", {"tokens": [1]})):
        r = client.post(path, json={**body, "model": "gpt-4"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_health_and_version(client: Any) -> None:
    """/health answers 200 with no body while the engine runs, without the API key (a
    probe, as /livez); /version names this package's version."""
    r = client.get("/health", headers={"Authorization": ""})
    assert r.status_code == 200 and r.content == b""
    assert client.get("/version").json()["version"] == "0.1.0"
    assert client.get("/version", headers={"Authorization": ""}).status_code == 401
