"""A tool_choice that forces a call, in-process on the default model: a named function's
arguments, or "required"'s list of calls, guided by the tools' parameter schemas and
answered as tool_calls (whole and streamed); the refusals, each message checked."""

from __future__ import annotations

import json
from typing import Any

import pytest
from service_testing import CHAT

WEATHER = {"name": "get_weather", "strict": True,
           "parameters": {"type": "object", "required": ["city"], "additionalProperties": False,
                          "properties": {"city": {"type": "string", "maxLength": 20},
                                         "unit": {"enum": ["celsius", "fahrenheit"]}}}}  # fmt: skip
TIME = {"name": "get_time",
        "parameters": {"type": "object", "required": ["zone"],
                       "properties": {"zone": {"enum": ["UTC", "CET"]}}}}  # fmt: skip
TOOLS = [{"type": "function", "function": f} for f in (WEATHER, TIME)]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def _weather_args(arguments: str) -> None:
    args = json.loads(arguments)
    assert set(args) <= {"city", "unit"} and isinstance(args["city"], str), args
    assert len(args["city"]) <= 20 and args.get("unit", "celsius") in ("celsius", "fahrenheit")


def test_a_named_function_is_called_with_its_schemas_arguments(client: Any) -> None:
    body = {"messages": ASK, "tools": TOOLS, "tool_choice": NAMED, "max_tokens": 60,
            "temperature": 0}  # fmt: skip
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    message = choice["message"]
    assert message["content"] is None and choice["finish_reason"] == "stop", choice
    [call] = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("chatcmpl-tool-")
    assert call["function"]["name"] == "get_weather"
    _weather_args(call["function"]["arguments"])


def test_required_answers_a_list_of_declared_calls(client: Any) -> None:
    body = {"messages": ASK, "tools": TOOLS, "tool_choice": "required", "max_tokens": 120,
            "temperature": 0.8, "seed": 2, "n": 2}  # fmt: skip
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        assert choice["finish_reason"] == "tool_calls", choice
        calls = choice["message"]["tool_calls"]
        assert calls and choice["message"]["content"] is None
        for call in calls:
            name, arguments = call["function"]["name"], call["function"]["arguments"]
            if name == "get_weather":
                _weather_args(arguments)
            else:
                assert name == "get_time" and json.loads(arguments)["zone"] in ("UTC", "CET")


def test_a_streamed_forced_call_comes_whole_at_the_end(client: Any) -> None:
    body = {"messages": ASK, "tools": TOOLS, "tool_choice": NAMED, "max_tokens": 60,
            "temperature": 0, "stream": True}  # fmt: skip
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = [x[6:] for x in r.iter_lines() if x.startswith("data: ")]
    chunks = [json.loads(x)["choices"][0] for x in lines[:-1]]
    assert lines[-1] == "[DONE]"
    assert [c["delta"].get("content") for c in chunks[:1]] == [""]  # (the role chunk)
    assert all(not c["delta"].get("content") for c in chunks)
    [call] = [c["delta"]["tool_calls"][0] for c in chunks if "tool_calls" in c["delta"]]
    assert call["index"] == 0 and call["function"]["name"] == "get_weather"
    _weather_args(call["function"]["arguments"])
    assert chunks[-1]["finish_reason"] == "stop"
    whole = {**body, "stream": False}
    same = client.post("/v1/chat/completions", json=whole).json()["choices"][0]["message"]
    assert same["tool_calls"][0]["function"]["arguments"] == call["function"]["arguments"]


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "f"}}},
            "tool_choice",
            "tool_choice: the function 'f' is not among the tools (['get_weather', 'get_time'])",
        ),  # fmt: skip
        (
            {"tool_choice": "required"},
            "tool_choice",
            "tool_choice: forcing a call needs tools, got 'required'",
        ),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
            "tool_choice: a forced call's arguments are guided, which json_object",
        ),
        (
            {
                "tools": TOOLS,
                "tool_choice": {"type": "function", "function": {"name": "get_time", "x": 1}},
            },
            "tool_choice",
            'tool_choice must be "none", "auto", "required" or',
        ),  # fmt: skip
        (
            {"tools": TOOLS, "tool_choice": NAMED, "min_tokens": 3},
            "tool_choice",
            "tool_choice (a forced call's arguments are guided): min_tokens cannot be combined "
            "with guided_json",
        ),  # fmt: skip
    ],
)
def test_refusals(client: Any, fields: dict, param: str, message: str) -> None:
    r = client.post("/v1/chat/completions", json={"messages": CHAT, **fields})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"].startswith(message), error
