"""In-process tests of the chat route's template: rendered off the event loop, with the
client's chat_template_kwargs."""

from __future__ import annotations

import asyncio
from typing import Any

from service_testing import CHAT


def test_chat_templates_render_off_the_event_loop(client: Any, engine: Any, monkeypatch: Any):
    """As tokenizing: 200,000 messages rendered for ~2 s on the event loop, holding every
    other stream and the worker's health probes (found in a security review)."""
    threads: list[bool] = []
    original = engine.apply_chat_template

    def recording(messages: Any, **options: Any) -> str:
        try:
            asyncio.get_running_loop()
            threads.append(False)
        except RuntimeError:
            threads.append(True)
        return original(messages, **options)

    monkeypatch.setattr(engine, "apply_chat_template", recording)
    for stream in (False, True):
        body = {"messages": CHAT, "max_tokens": 2, "stream": stream}
        assert client.post("/v1/chat/completions", json=body).status_code == 200
    assert threads == [True, True]


def test_chat_template_kwargs_reach_the_template(client: Any, engine: Any, monkeypatch: Any):
    """As vLLM's chat route (e.g. Qwen3's enable_thinking): more variables for the template."""
    template = "{{ messages[0]['content'] }}{% if shout %}!{% endif %}"
    monkeypatch.setattr(engine.tokenizer, "chat_template", template)
    prompts: list[str] = []
    templated = engine.apply_chat_template

    def recording(messages: Any, **options: Any) -> str:
        prompts.append(templated(messages, **options))
        return prompts[-1]

    monkeypatch.setattr(engine, "apply_chat_template", recording)
    chat = [{"role": "user", "content": "hi"}]
    for kwargs in ({"shout": True}, {}, None):
        body = {"messages": chat, "max_tokens": 1, "chat_template_kwargs": kwargs}
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
    assert prompts == ["hi!", "hi", "hi"]
