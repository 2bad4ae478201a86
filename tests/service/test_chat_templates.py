"""In-process tests of the chat route's template: rendered off the event loop, with the
client's chat_template_kwargs, or the client's own template (vLLM's chat_template, under the
server setting trust_request_chat_template); and vLLM's chat echo."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
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


# a template that puts a marker word before each message, then the answer's
MARKED = "{% for m in messages %}Question: {{ m['content'] }}\n{% endfor %}Answer:"
UNTRUSTED = (
    "chat_template: a request's own chat template needs the server setting "
    "trust_request_chat_template (VLLM_RUNNER_TRUST_REQUEST_CHAT_TEMPLATE=true; vLLM's "
    "--trust-request-chat-template), got "
)


@pytest.fixture
def trusted(service_module: Any) -> Iterator[None]:
    """The server setting trust_request_chat_template on, for one test. (Not monkeypatch:
    it takes a Starlette State's attribute for unset, and deletes it afterwards.)"""
    state = service_module.openai_app.state
    state.trust_request_chat_template = True
    yield
    state.trust_request_chat_template = False


def test_a_requests_own_template_renders_the_prompt(client: Any, engine: Any, trusted: None):
    """As vLLM's (with --trust-request-chat-template): the prompt is the request's template's
    text, generated from as the same tokens sent to /v1/completions would be."""
    text = "Question: What is the capital of France?\nAnswer:"
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    body = {"messages": CHAT, "max_tokens": 6, "temperature": 0, "chat_template": MARKED}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(ids)
    plain = {"prompt": ids, "max_tokens": 6, "temperature": 0}
    completion = client.post("/v1/completions", json=plain).json()["choices"][0]["text"]
    assert r.json()["choices"][0]["message"]["content"] == completion
    counted = client.post("/tokenize", json={"messages": CHAT, "chat_template": MARKED})
    assert counted.json()["tokens"] == ids
    # and with beam search, which takes the templating fields
    beams = client.post("/v1/chat/completions", json={**body, "use_beam_search": True})
    assert beams.status_code == 200 and beams.json()["usage"]["prompt_tokens"] == len(ids)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{% for %}", "TemplateSyntaxError: Expected an expression, got 'end of statement block'"),
        ("{{ 1 / 0 }}", "ZeroDivisionError: division by zero"),  # (was a 500)
        ("{{ raise_exception('no system role') }}", "no system role"),
        # the sandbox: no Python internals
        ("{{ ''.__class__.__mro__ }}",
         "SecurityError: access to attribute '__class__' of 'str' object is unsafe."),
    ],
)  # fmt: skip
def test_a_template_that_fails_is_a_400_naming_it(
    client: Any, trusted: None, template: str, message: str
) -> None:
    for path in ("/v1/chat/completions", "/tokenize"):
        r = client.post(path, json={"messages": CHAT, "chat_template": template})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["message"] == f"chat_template: the request's template failed: {message}"
        assert error["param"] == "chat_template"


def test_a_template_is_refused_untrusted_or_too_long(client: Any, service_module: Any):
    for path in ("/v1/chat/completions", "/tokenize"):
        r = client.post(path, json={"messages": CHAT, "chat_template": MARKED})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["message"] == UNTRUSTED + repr(MARKED)
        assert r.json()["error"]["param"] == "chat_template"
        long = "x" * 65_537
        r = client.post(path, json={"messages": CHAT, "chat_template": long})
        assert r.status_code == 400, r.text
        assert r.json()["error"] == {
            "message": "chat_template: at most 65536 characters, got 65537",
            "type": "invalid_request_error",
            "param": "chat_template",
            "code": None,
        }
    assert service_module.openai_app.state.trust_request_chat_template is False  # (the default)


STARTED = [*CHAT, {"role": "assistant", "content": "The capital"}]
CONTINUE = {"add_generation_prompt": False, "continue_final_message": True}


def test_chat_echo_starts_the_reply_with_the_continued_message(client: Any) -> None:
    """vLLM's echo: continuing the assistant's message, the reply starts with it; streamed,
    in a chunk of its own after the role's."""
    body = {"messages": STARTED, "max_tokens": 4, "temperature": 0, **CONTINUE}
    plain = client.post("/v1/chat/completions", json=body).json()
    r = client.post("/v1/chat/completions", json={**body, "echo": True})
    assert r.status_code == 200, r.text
    generated = plain["choices"][0]["message"]["content"]
    assert r.json()["choices"][0]["message"]["content"] == "The capital" + generated
    assert r.json()["usage"] == plain["usage"]  # (the echo is no generated token)
    stream = client.post("/v1/chat/completions", json={**body, "echo": True, "stream": True})
    data = [json.loads(line[6:]) for line in stream.text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]  # fmt: skip
    deltas = [d["choices"][0]["delta"] for d in data]
    assert deltas[:2] == [{"role": "assistant", "content": ""}, {"content": "The capital"}]
    assert "".join(d.get("content", "") for d in deltas) == "The capital" + generated
    # a new assistant turn after a user's message echoes nothing
    body = {"messages": CHAT, "max_tokens": 4, "temperature": 0}
    plain = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    echo = client.post("/v1/chat/completions", json={**body, "echo": True}).json()
    assert echo["choices"][0]["message"] == plain
    # beam search does not echo: refused rather than ignored
    r = client.post("/v1/chat/completions", json={**body, "echo": True, "use_beam_search": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "echo", r.text
