"""The chat route's tool calls on a scripted engine (``serving_fakes.FakeEngine`` sending given
text deltas) under the server setting tool_call_parser=hermes: whole and streamed answers in
OpenAI's shape, exact. Fast: no model, no BentoML."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from serving_fakes import FakeEngine, outputs
from starlette.testclient import TestClient

ABC = [{"role": "user", "content": "a b c"}]
WEATHER = {"name": "get_weather", "parameters": {"type": "object"}}
TOOLS = [{"type": "function", "function": WEATHER}]
# "Let me check.\n" then a call, its tag cut across deltas as tokens cut it
PIECES = ["Let me", " check.\n<", "tool", "_call>\n{\"name\": \"get_", 'weather", "arguments": ',
          '{"city": "Par', 'is"}}\n</tool', "_call>"]  # fmt: skip
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
TOOL_ID = r"chatcmpl-tool-[0-9a-f]{32}"


def client_for(engine: FakeEngine, parser: str | None = "hermes") -> TestClient:
    from vllm_runner.serving.openai_api import create_openai_app

    return TestClient(create_openai_app(lambda: engine, parser))


def chunks(response: Any) -> list[dict]:
    data = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d)["choices"][0] for d in data[:-1]]


@pytest.mark.parametrize("reason", ["stop", "length"])
def test_a_whole_answer_carries_the_calls(reason: str) -> None:
    """As vLLM: the content is the text before the call; finish_reason "tool_calls", also
    when a length limit ended the output after a whole call."""
    client = client_for(FakeEngine(outputs(PIECES, reason=reason)))
    r = client.post("/v1/chat/completions", json={"messages": ABC, "tools": TOOLS})
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    (call,) = choice["message"]["tool_calls"]
    assert re.fullmatch(TOOL_ID, call["id"]), call
    message = {"role": "assistant", "content": "Let me check.\n", "tool_calls": [{**call, **CALL}]}
    assert choice == {"index": 0, "message": message, "logprobs": None,
                      "finish_reason": "tool_calls", "stop_reason": None}  # fmt: skip
    assert r.json()["usage"]["completion_tokens"] == len(PIECES)


def test_a_stream_sends_content_until_the_tag_then_the_calls() -> None:
    client = client_for(FakeEngine(outputs(PIECES)))
    body = {"messages": ABC, "tools": TOOLS, "tool_choice": "auto", "stream": True}
    got = chunks(client.post("/v1/chat/completions", json=body))
    call_id = got[3]["delta"]["tool_calls"][0]["id"]
    assert re.fullmatch(TOOL_ID, call_id)
    assert [c["delta"] for c in got] == [
        {"role": "assistant", "content": ""},
        {"content": "Let me"},
        {"content": " check.\n"},  # (the "<" that ended this delta held back)
        {"tool_calls": [{"index": 0, "id": call_id, **CALL}]},
        {},
    ]
    assert [c["finish_reason"] for c in got] == [None, None, None, None, "tool_calls"]


def test_each_choice_is_parsed_on_its_own() -> None:
    """n = 2, interleaved: a call in choice 0, text with a bad block in choice 1."""
    bad = '<tool_call>{"name": "get_weather", "arguments": {"city": }}</tool_call>'
    plain = ["Sunny", " in Paris ", bad[:5], bad[5:]]
    zero, one = outputs(PIECES), outputs(plain, 1)
    updates = [u for pair in zip(zero[:4], one, strict=True) for u in pair] + zero[4:]
    engine = FakeEngine(updates)
    body = {"messages": ABC, "tools": TOOLS, "n": 2}
    r = client_for(engine).post("/v1/chat/completions", json=body)
    first, second = r.json()["choices"]
    assert (
        first["finish_reason"] == "tool_calls" and first["message"]["content"] == "Let me check.\n"
    )
    assert second["message"] == {"role": "assistant", "content": "Sunny in Paris " + bad}
    assert second["finish_reason"] == "stop"
    got = chunks(client_for(engine).post("/v1/chat/completions", json={**body, "stream": True}))
    text = [c["delta"].get("content") or "" for c in got if c["index"] == 1]
    assert text == ["", "Sunny", " in Paris ", bad, ""]  # ("<tool" held, then given back)
    assert [c["finish_reason"] for c in got if c["finish_reason"]] == ["stop", "tool_calls"]


def test_an_answer_without_calls_is_plain_content() -> None:
    pieces = ["Paris", " is", " sunny", " <3"]
    client = client_for(FakeEngine(outputs(pieces)))
    body = {"messages": ABC, "tools": TOOLS}
    (choice,) = client.post("/v1/chat/completions", json=body).json()["choices"]
    assert choice["message"] == {"role": "assistant", "content": "Paris is sunny <3"}
    assert choice["finish_reason"] == "stop"
    got = chunks(client.post("/v1/chat/completions", json={**body, "stream": True}))
    assert [c["delta"] for c in got] == [{"role": "assistant", "content": ""},
        {"content": "Paris"}, {"content": " is"}, {"content": " sunny"}, {"content": " <3"},
        {}]  # fmt: skip


def test_tool_choice_none_leaves_the_output_unparsed() -> None:
    client = client_for(FakeEngine(outputs(PIECES)))
    body = {"messages": ABC, "tools": TOOLS, "tool_choice": "none"}
    (choice,) = client.post("/v1/chat/completions", json=body).json()["choices"]
    assert choice["message"] == {"role": "assistant", "content": "".join(PIECES)}
    assert choice["finish_reason"] == "stop"
    got = chunks(client.post("/v1/chat/completions", json={**body, "stream": True}))
    assert [c["delta"].get("content") for c in got[1:-1]] == PIECES


def test_auto_needs_the_server_setting() -> None:
    client = client_for(FakeEngine(outputs(PIECES)), parser=None)
    for choice in ({}, {"tool_choice": "auto"}):
        r = client.post("/v1/chat/completions", json={"messages": ABC, "tools": TOOLS, **choice})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "tool_choice"
        lead = 'tool_choice: "auto" needs the server setting tool_call_parser (VLLM_RUNNER_'
        assert error["message"].startswith(lead), error
    body = {"messages": ABC, "tools": TOOLS, "tool_choice": "none"}
    r = client.post("/v1/chat/completions", json=body)
    assert r.json()["choices"][0]["message"]["content"] == "".join(PIECES)
    body = {"messages": ABC, "tool_choice": "auto"}  # no tools: nothing to call, nothing parsed
    assert client.post("/v1/chat/completions", json=body).status_code == 200


def test_a_server_with_an_unknown_parser_does_not_start() -> None:
    with pytest.raises(ValueError, match=r"^tool_call_parser must be one of hermes, .*'granite'$"):
        client_for(FakeEngine(), parser="granite")
