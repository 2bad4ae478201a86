"""A request's ``priority`` on the service's routes: under the engine's default "fcfs" policy
a non-zero one is a 400 naming it (0, and null on the OpenAI routes, are taken); under an
engine whose policy is "priority", every generating route passes it on to the engine."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from service_testing import CHAT, PROMPT

OPENAI = [
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 2}),
]
REFUSED = (
    "priority must be 0 unless scheduling_policy is 'priority' (priority scheduling is not "
    "enabled: this engine's is 'fcfs'), got {}"
)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("path", "body"), OPENAI)
def test_openai_routes_refuse_a_priority_under_fcfs(client: Any, path, body, stream) -> None:
    r = client.post(path, json={**body, "priority": 3, "stream": stream})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"], error["message"]) == ("priority", REFUSED.format(3))


@pytest.mark.parametrize("priority", [0, None])
@pytest.mark.parametrize(("path", "body"), OPENAI)
def test_openai_routes_take_priority_0_and_null(client: Any, path, body, priority) -> None:
    r = client.post(path, json={**body, "priority": priority})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(("path", "body"), OPENAI)
def test_openai_routes_refuse_a_priority_past_int64(client: Any, path, body) -> None:
    r = client.post(path, json={**body, "priority": 2**63})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "priority"


def test_native_routes_refuse_a_priority_under_fcfs(client: Any) -> None:
    r = client.post("/generate", json={"prompt": PROMPT, "max_tokens": 2, "priority": -1})
    assert r.status_code == 400 and REFUSED.format(-1) in r.text, r.text
    items = [{"prompt": PROMPT, "max_tokens": 2}, {"prompt": PROMPT, "priority": 4}]
    r = client.post("/complete", json={"requests": items})
    assert r.status_code == 400 and REFUSED.format(4) in r.text, r.text
    r = client.post("/generate", json={"prompt": PROMPT, "max_tokens": 2, "priority": 2**63})
    assert r.status_code == 400 and "priority" in r.text, r.text
    r = client.post("/generate", json={"prompt": PROMPT, "max_tokens": 2, "priority": 0})
    assert r.status_code == 200 and r.text, r.text


@pytest.fixture
def priorities(engine: Any, monkeypatch) -> list:
    """The service's engine with the checks of scheduling_policy="priority" (its scheduler
    stays as it is), and the priority each request reaches it with, in order."""
    limits = dataclasses.replace(engine.inputs.limits, scheduling_policy="priority")
    monkeypatch.setattr(engine.inputs, "limits", limits)
    seen: list = []
    stream, generate = engine.stream, engine.generate

    def spy_stream(*args: Any, priority: int = 0, **kwargs: Any) -> Any:
        seen.append(priority)
        return stream(*args, priority=priority, **kwargs)

    async def spy_generate(*args: Any, priority: Any = None, **kwargs: Any) -> Any:
        seen.append(priority)
        return await generate(*args, priority=priority, **kwargs)

    monkeypatch.setattr(engine, "stream", spy_stream)
    monkeypatch.setattr(engine, "generate", spy_generate)
    return seen


def test_openai_routes_pass_the_priority_on(client: Any, priorities: list) -> None:
    completions = {"prompt": [PROMPT, "Hello"], "max_tokens": 2, "priority": 3}
    assert client.post("/v1/completions", json=completions).status_code == 200
    streamed = {**completions, "prompt": PROMPT, "priority": -(2**63), "stream": True}
    assert client.post("/v1/completions", json=streamed).status_code == 200
    chat = {"messages": CHAT, "max_tokens": 2, "priority": -2}
    assert client.post("/v1/chat/completions", json=chat).status_code == 200
    assert client.post("/v1/chat/completions", json={**chat, "stream": True}).status_code == 200
    assert client.post("/v1/chat/completions", json={**chat, "priority": None}).status_code == 200
    assert priorities == [3, 3, -(2**63), -2, -2, 0]


def test_native_routes_pass_the_priority_on(client: Any, priorities: list) -> None:
    r = client.post("/generate", json={"prompt": PROMPT, "max_tokens": 2, "priority": 5})
    assert r.status_code == 200 and r.text, r.text
    items = [
        {"prompt": PROMPT, "max_tokens": 2, "priority": 1},
        {"prompt": PROMPT, "max_tokens": 2},
        {"prompt": [504, 3458, 282], "max_tokens": 2, "priority": -1},
    ]
    r = client.post("/complete", json={"requests": items})
    assert r.status_code == 200 and [o["finish_reason"] for o in r.json()] == ["length"] * 3
    assert priorities == [5, [1, 0, -1]]
