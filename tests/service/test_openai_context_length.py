"""A request past the model's context is refused as OpenAI and vLLM refuse it: a 400 whose
message says "This model's maximum context length is N tokens" and whose code is
"context_length_exceeded". Clients key on these (litellm's ContextWindowExceededError and
its context-window fallbacks, agent frameworks that trim the history and retry)."""

from __future__ import annotations

from typing import Any

import pytest
from service_testing import CHAT, MAX_MODEL_LEN, PROMPT

LEAD = f"This model's maximum context length is {MAX_MODEL_LEN} tokens"


def _body(path: str, text: str | None = None) -> dict[str, Any]:
    if path == "/v1/completions":
        return {"prompt": text or PROMPT}
    return {"messages": [{"role": "user", "content": text}] if text else CHAT}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_context_length_errors_read_as_openai_and_vllm_say_them(
    client: Any, engine: Any, path: str, stream: bool
) -> None:
    too_long = "hello " * (MAX_MODEL_LEN + 10)  # tokenized: more tokens than the context
    too_many_chars = "x" * (engine.inputs.max_prompt_chars + 1)  # refused untokenized
    prompt = "prompt" if path == "/v1/completions" else "messages"
    for body, param, says in (
        ({**_body(path), "max_tokens": 1000}, "max_tokens", "max_tokens 1000"),
        (_body(path, too_long), prompt, "prompt has"),
        (_body(path, too_many_chars), prompt, "characters"),
    ):
        r = client.post(path, json={**body, "stream": stream})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["message"].startswith(LEAD), error
        assert says in error["message"], error  # our own account of it follows
        assert (error["code"], error["param"]) == ("context_length_exceeded", param), error


def test_other_bad_requests_keep_no_code(client: Any) -> None:
    r = client.post("/v1/completions", json={"prompt": PROMPT, "temperature": -1})
    assert r.status_code == 400 and r.json()["error"]["code"] is None
