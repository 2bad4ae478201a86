"""Tool calling on /v1/chat/completions, in-process on the default model: tools and earlier
calls rendered by a chat template that knows them, calls parsed from the model's real output
(guided_choice makes it write one) under the setting tool_call_parser=hermes, and the
refusals, each message checked."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from service_testing import CHAT, PROMPT

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}
TOOLS = [{"type": "function", "function": WEATHER}]
# a Hermes-style template of this test's own (the default model's ignores tools)
TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t | tojson }}{% endfor %}"
    "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>\n"
    '{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}'
    "\n</tool_call>{% endfor %}{% if m.tool_call_id %} [{{ m.tool_call_id }}]{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
EARLIER = {"id": "call_1", "type": "function",
           "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}  # fmt: skip
CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [EARLIER]},
    {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
]


@pytest.fixture
def prompts(engine: Any, monkeypatch: Any) -> list[str]:
    """The prompts the chat route renders, with TEMPLATE as the model's."""
    monkeypatch.setattr(engine.tokenizer, "chat_template", TEMPLATE)
    rendered: list[str] = []
    templated = engine.apply_chat_template

    def recording(messages: Any, **options: Any) -> str:
        rendered.append(templated(messages, **options))
        return rendered[-1]

    monkeypatch.setattr(engine, "apply_chat_template", recording)
    return rendered


@pytest.fixture
def hermes(service_module: Any) -> Iterator[None]:
    """The server as with VLLM_RUNNER_TOOL_CALL_PARSER=hermes."""
    from vllm_runner.serving.tool_parsers import HermesToolParser

    # NOTE: not monkeypatch.setattr: its undo deletes what a State holds (not in its __dict__)
    state = service_module.openai_app.state
    saved, state.tool_parser = state.tool_parser, HermesToolParser()
    yield
    state.tool_parser = saved


def test_tools_and_earlier_calls_reach_the_template(client: Any, prompts: list[str]) -> None:
    """As HF transformers takes them: tools= their JSON schemas, a call's arguments a dict,
    the tool message's tool_call_id."""
    body = {"messages": CONVERSATION, "tools": TOOLS, "tool_choice": "none", "max_tokens": 1}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert prompts == [
        f"<|im_start|>system\nTools: {json.dumps(TOOLS[0])}<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        f"<|im_start|>assistant\n{CALL}<|im_end|>\n"
        "<|im_start|>tool\nsunny [call_1]<|im_end|>\n<|im_start|>assistant\n"
    ]
    bare = [{"type": "function", "function": {"name": "f", "description": None}}]
    assert client.post("/v1/chat/completions", json={**body, "tools": bare}).status_code == 200
    assert 'Tools: {"type": "function", "function": {"name": "f"}}<|im_end|>' in prompts[-1]


def test_tokenize_renders_the_tools_as_chat(client: Any, prompts: list[str]) -> None:
    body = {"messages": CONVERSATION, "tools": TOOLS}
    count = client.post("/tokenize", json=body).json()["count"]
    chat = {**body, "tool_choice": "none", "max_tokens": 1}
    usage = client.post("/v1/chat/completions", json=chat).json()["usage"]
    assert count == usage["prompt_tokens"]
    assert prompts[0] == prompts[1] and "Tools: " in prompts[0]
    assert client.post("/tokenize", json={"messages": CONVERSATION}).json()["count"] < count


def _forced(text: str, **fields: Any) -> dict[str, Any]:
    """A chat body whose output is ``text`` (the only choice), greedy."""
    return {"messages": CHAT, "tools": TOOLS, "max_tokens": 64, "temperature": 0,
            "guided_choice": [text], **fields}  # fmt: skip


def test_a_call_in_the_models_output_is_parsed(client: Any, prompts: list, hermes: None) -> None:
    r = client.post("/v1/chat/completions", json=_forced(f"Checking.\n{CALL}"))
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    (call,) = choice["message"].pop("tool_calls")
    assert re.fullmatch(r"chatcmpl-tool-[0-9a-f]{32}", call.pop("id"))
    function = {"name": "get_weather", "arguments": '{"city":"Paris"}'}
    assert call == {"type": "function", "function": function}
    assert choice["message"] == {"role": "assistant", "content": "Checking.\n"}
    assert choice["finish_reason"] == "tool_calls"
    assert "Tools: " in prompts[0]


def test_a_streamed_call_holds_its_tag_back(client: Any, prompts: list, hermes: None) -> None:
    """The model writes the tag in several tokens: none of them is sent as content."""
    body = _forced(f"Checking.\n{CALL}", stream=True)
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        data = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    choices = [d["choices"][0] for d in data]
    content = [c["delta"]["content"] for c in choices if c["delta"].get("content")]
    assert "".join(content) == "Checking.\n" and len(content) > 1, content
    calls = [c["delta"]["tool_calls"] for c in choices if "tool_calls" in c["delta"]]
    assert [[{**x, "id": None} for x in call] for call in calls] == [[{"index": 0, "id": None,
        "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
    ]]  # fmt: skip
    assert [c["finish_reason"] for c in choices if c["finish_reason"]] == ["tool_calls"]


def test_output_without_a_good_call_is_content(client: Any, prompts: list, hermes: None) -> None:
    """A call of an undeclared function stays text (tool_choice "none", and other bad calls:
    tests/unit/test_tool_call_routes.py, on a scripted engine)."""
    undeclared = '<tool_call>{"name": "get_time"}</tool_call>'
    (choice,) = client.post("/v1/chat/completions", json=_forced(undeclared)).json()["choices"]
    assert choice["message"] == {"role": "assistant", "content": undeclared}
    assert choice["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        ({"tool_choice": "sometimes"}, "tool_choice",
         'tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
         "{\"name\": ...}}, got 'sometimes'"),
        ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, "tools",
         "tools.0.function.name: String should match pattern '^[a-zA-Z0-9_-]{1,64}$', got "
         "'get weather'"),
        ({"tools": [{"type": "function", "function": {"name": "x" * 65}}]}, "tools",
         "tools.0.function.name: String should match pattern '^[a-zA-Z0-9_-]{1,64}$', got "
         f"'{'x' * 65}'"),
        ({"tools": TOOLS * 2}, "tools",
         "tools: each function needs a name of its own, got 'get_weather' 2 times"),
        ({"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]},
         "tools", "tools: at most 128 tools, got 129"),
        ({"tools": [{"type": "function", "function": {**WEATHER, "strict": True}}]}, "tools",
         "tools: tools.0.function.strict holds the arguments to their schema only when "
         "tool_choice forces a call (\"required\" or a named function), got tool_choice "
         "'auto'"),
        ({"tools": [{"type": "function"}]}, "tools", "tools.0.function: Field required"),
        ({"functions": [WEATHER]}, "functions",
         "functions: function calling (functions) is not supported by this server, got "),
        ({"function_call": "auto"}, "function_call",
         "function_call: function calling (function_call) is not supported by this server, got "
         "'auto'"),
    ],
)  # fmt: skip
def test_refused_tool_fields(client: Any, fields: dict, param: str, message: str) -> None:
    r = client.post("/v1/chat/completions", json={"messages": CHAT, **fields})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"].startswith(message), error


def _with(message: dict) -> list[dict]:
    return [*CHAT, message]


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        (_with({"role": "assistant", "tool_calls": [{**EARLIER, "function": {
            "name": "get_weather", "arguments": "city=Paris"}}]}),
         "messages.1.tool_calls.0.function.arguments: must be a JSON object's text, got "
         "'city=Paris'"),
        (_with({"role": "assistant", "tool_calls": [{**EARLIER, "function": {
            "name": "get_weather", "arguments": "[1, 2]"}}]}),
         "messages.1.tool_calls.0.function.arguments: must be a JSON object's text, got "
         "'[1, 2]'"),
        (_with({"role": "assistant", "tool_calls": [{**EARLIER, "function": {
            "name": "get_weather", "arguments": "[" * 100_000}}]}),  # (past Python's stack)
         "messages.1.tool_calls.0.function.arguments: must be a JSON object's text, got "
         f"'{'[' * 79}..."),
        ([{**CHAT[0], "tool_calls": [EARLIER]}],
         "messages.0: tool_calls: only an assistant message makes tool calls, got a user "
         "message with 1"),
        (_with({"role": "assistant", "content": "x", "function_call": {"name": "f"}}),
         "messages.1: function_call: legacy function calling is not supported by this server "
         "(tool calls are: tool_calls), got {'name': 'f'}"),
        (_with({"role": "assistant", "tool_calls": [{"type": "function",
                                                     "function": EARLIER["function"]}]}),
         "messages.1.tool_calls.0.id: Field required"),
    ],
)  # fmt: skip
def test_refused_messages_name_their_index(client: Any, messages: list, message: str) -> None:
    r = client.post("/v1/chat/completions", json={"messages": messages})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "messages" and error["message"] == message, error


def test_refused_beside_other_routes_and_settings(client: Any, hermes: None) -> None:
    r = client.post("/v1/completions", json={"prompt": PROMPT, "tools": TOOLS})
    assert r.json()["error"]["message"].startswith(
        "tools: tool calling on /v1/completions (use /v1/chat/completions) is not supported by "
        "this server, got [{"
    ), r.text
    body = {"messages": CHAT, "tools": TOOLS, "use_beam_search": True, "n": 2}
    error = client.post("/v1/chat/completions", json=body).json()["error"]
    assert error["param"] == "use_beam_search" and error["message"] == (
        'use_beam_search: beams are not parsed for tool calls; send tool_choice "none" with '
        "it, got tool_choice left out (auto, with tools)"
    )
    r = client.post("/tokenize", json={"prompt": PROMPT, "tools": TOOLS})
    assert r.status_code == 400 and r.json()["error"]["message"] == (
        "tools: only with messages (the chat template renders them), got 1 with a prompt"
    ), r.text
