"""The chat route's tool calls under the settings tool_call_parser=llama3_json, mistral and
pythonic, on a scripted engine (``serving_fakes.FakeEngine``): whole and streamed answers in
OpenAI's shape, exact; and the refusal of a tool whose parameters are not an object's schema.
Fast: no model, no BentoML."""

from __future__ import annotations

import re
from typing import Any

import pytest
from serving_fakes import FakeEngine
from test_tool_call_routes import ABC, CALL, TOOL_ID, TOOLS, chunks, client_for, outputs

MISTRAL_ID = r"[A-Za-z0-9]{9}"
# (parser, the output a token a piece, the content, the calls' id pattern)
ANSWERS = {
    "llama3_json": (['{"name": "get_', 'weather", "parameters": ', '{"city": "Par', 'is"}}'],
                    None, TOOL_ID),
    "mistral": (["Let me", " check.\n[TOOL", "_CALLS]get_weather", '{"city": "Paris"}'],
                "Let me check.\n", MISTRAL_ID),
    "pythonic": (["[get_weather(", 'city="Paris")]'], None, TOOL_ID),
}  # fmt: skip


def _post(parser: str, pieces: list[str], **fields: Any) -> tuple[FakeEngine, Any]:
    engine = FakeEngine(outputs(pieces))
    body = {"messages": ABC, "tools": TOOLS, **fields}
    return engine, client_for(engine, parser).post("/v1/chat/completions", json=body)


@pytest.mark.parametrize("parser", ANSWERS)
def test_a_whole_answer_carries_the_calls(parser: str) -> None:
    pieces, content, id_pattern = ANSWERS[parser]
    _, r = _post(parser, pieces)
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    (call,) = choice["message"]["tool_calls"]
    assert re.fullmatch(id_pattern, call["id"]), call
    message = {"role": "assistant", "content": content, "tool_calls": [{**call, **CALL}]}
    assert choice == {"index": 0, "message": message, "logprobs": None,
                      "finish_reason": "tool_calls", "stop_reason": None}  # fmt: skip


@pytest.mark.parametrize("parser", ANSWERS)
def test_a_stream_sends_content_until_the_calls(parser: str) -> None:
    pieces, content, id_pattern = ANSWERS[parser]
    _, r = _post(parser, pieces, stream=True)
    got = chunks(r)
    call = got[-2]["delta"]["tool_calls"][0]
    assert re.fullmatch(id_pattern, call["id"]), call
    sent = [{"content": "Let me"}, {"content": " check.\n"}] if content else []
    assert [c["delta"] for c in got] == [
        {"role": "assistant", "content": ""},
        *sent,  # (Mistral's: up to its tag; the others': none, the calls open the output)
        {"tool_calls": [{"index": 0, "id": call["id"], **CALL}]},
        {},
    ]
    assert got[-1]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize(
    ("parser", "pieces"),
    [("llama3_json", ['{"city"', ': "Paris"}']), ("pythonic", ["[1]", " is a note"]),
     ("mistral", ["[TOOL_CALLS]", "delete_all{}"])],
)  # fmt: skip
def test_output_without_a_good_call_is_content(parser: str, pieces: list[str]) -> None:
    """Held back while it may be a call, then given as content at the end."""
    _, r = _post(parser, pieces)
    (choice,) = r.json()["choices"]
    assert choice["message"] == {"role": "assistant", "content": "".join(pieces)}
    assert choice["finish_reason"] == "stop"
    got = chunks(_post(parser, pieces, stream=True)[1])
    assert [c["delta"] for c in got] == [{"role": "assistant", "content": ""},
                                         {"content": "".join(pieces)}, {}]  # fmt: skip


def test_mistral_keeps_special_tokens() -> None:
    """Its [TOOL_CALLS] is a special token, so the output keeps them (as vLLM's parser asks);
    only where the output is parsed."""
    pieces = ANSWERS["mistral"][0]
    assert _post("mistral", pieces)[0].params[0].skip_special_tokens is False
    assert _post("mistral", pieces, tool_choice="none")[0].params[0].skip_special_tokens is True
    assert _post("hermes", pieces)[0].params[0].skip_special_tokens is True


@pytest.mark.parametrize(
    ("parameters", "shown"), [({"type": "string"}, "'string'"), ({"type": "array"}, "'array'"),
                              ({"type": ["object", "null"]}, "['object', 'null']")]
)  # fmt: skip
def test_a_tool_that_takes_no_object_is_refused(parameters: dict, shown: str) -> None:
    """A call's arguments are an object: a schema of another type is refused (with any
    tool_choice), naming the function and the type."""
    tools = [TOOLS[0], {"type": "function", "function": {"name": "f", "parameters": parameters}}]
    for choice in ("none", {"type": "function", "function": {"name": "f"}}):
        _, r = _post("hermes", ["{}"], tools=tools, tool_choice=choice)
        assert r.status_code == 400, r.text
        assert r.json()["error"] == {
            "message": "tools.1.function: parameters: the function 'f' takes its arguments as an "
            f"object: its schema's \"type\" must be \"object\" (or left out), got {shown}",
            "type": "invalid_request_error", "param": "tools", "code": None,
        }  # fmt: skip


@pytest.mark.parametrize("parameters", [None, {}, {"properties": {"x": {"type": "integer"}}}])
def test_a_schema_without_a_type_is_taken(parameters: dict | None) -> None:
    function = {"name": "f"} if parameters is None else {"name": "f", "parameters": parameters}
    tools = [{"type": "function", "function": function}]
    _, r = _post("hermes", ["Hi"], tools=tools, tool_choice="none")
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Hi", r.text
