"""The chat route's reasoning on a scripted engine (``serving_fakes.FakeEngine`` sending given
text deltas) under the server setting reasoning_parser: whole and streamed answers in vLLM's
shape (``reasoning_content`` beside ``content``), exact; with tool calls, guided outputs, n > 1
with logprobs, beam search, and the routes it leaves alone. Fast: no model, no BentoML."""

from __future__ import annotations

import asyncio
import json
import re
from types import SimpleNamespace
from typing import Any

import pytest
from serving_fakes import FakeEngine, outputs
from starlette.testclient import TestClient

from vllm_runner.beam_search import BeamSearchOutput, BeamSearchSequence
from vllm_runner.serving import beam_route
from vllm_runner.serving import openai_format as fmt
from vllm_runner.serving.protocol import ChatCompletionRequest
from vllm_runner.serving.reasoning_parsers import REASONING_PARSERS

ABC = [{"role": "user", "content": "a b c"}]
# Qwen3's form, each tag cut across deltas as tokens cut it
THOUGHT = ["<th", "ink>\nLet", " me think.</", "think>\n\nParis", "."]
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
]
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
TOOL_ID = r"chatcmpl-tool-[0-9a-f]{32}"


def client_for(engine: FakeEngine, reasoning: str | None, tools: str | None = None) -> TestClient:
    from vllm_runner.serving.openai_api import create_openai_app

    return TestClient(create_openai_app(lambda: engine, tools, reasoning))


def post(client: TestClient, **body: Any) -> Any:
    r = client.post("/v1/chat/completions", json={"messages": ABC, **body})
    assert r.status_code == 200, r.text
    return r


def events(response: Any) -> list[dict]:
    """A stream's events, less the request's id and time."""
    data = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [{k: v for k, v in json.loads(d).items() if k not in ("id", "created")}
            for d in data[:-1]]  # fmt: skip


def chunks(response: Any) -> list[dict]:
    return [event["choices"][0] for event in events(response)]


def test_a_whole_answer_splits_off_the_reasoning() -> None:
    r = post(client_for(FakeEngine(outputs(THOUGHT)), "qwen3"))
    message = {"role": "assistant", "content": "\n\nParis.", "reasoning_content": "\nLet me think."}
    assert r.json()["choices"] == [
        {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop",
         "stop_reason": None}
    ]  # fmt: skip
    assert r.json()["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}


def test_a_stream_sends_reasoning_then_content_and_no_tag() -> None:
    got = chunks(post(client_for(FakeEngine(outputs(THOUGHT)), "qwen3"), stream=True))
    assert [c["delta"] for c in got] == [
        {"role": "assistant", "content": ""},
        # "<th": held back (a piece of <think>), then the tag: nothing sent
        {"reasoning_content": "\nLet"},
        {"reasoning_content": " me think."},  # ("</" held back)
        {"content": "\n\nParis"},
        {"content": "."},
        {},
    ]
    assert [c["finish_reason"] for c in got] == [None] * 5 + ["stop"]


def test_a_length_stop_inside_the_reasoning() -> None:
    """deepseek_r1: the template opened the reasoning; no </think>: all reasoning, also the
    piece of a tag it ended in (held back until then)."""
    engine = FakeEngine(outputs(["Hmm, ", "let me see", " </"], reason="length"))
    client = client_for(engine, "deepseek_r1")
    (choice,) = post(client).json()["choices"]
    assert choice["message"] == {
        "role": "assistant",
        "content": None,
        "reasoning_content": "Hmm, let me see </",
    }
    assert choice["finish_reason"] == "length"
    got = chunks(post(client, stream=True))
    assert [c["delta"] for c in got] == [{"role": "assistant", "content": ""},
        {"reasoning_content": "Hmm, "}, {"reasoning_content": "let me see"},
        {"reasoning_content": " "}, {"reasoning_content": "</"}, {}]  # fmt: skip
    assert got[-1]["finish_reason"] == "length"


def test_a_delta_that_ends_the_reasoning_carries_both() -> None:
    client = client_for(FakeEngine(outputs(["Hm", ".</think>Par", "is."])), "deepseek_r1")
    got = chunks(post(client, stream=True))
    assert [c["delta"] for c in got[1:]] == [
        {"reasoning_content": "Hm"},
        {"reasoning_content": ".", "content": "Par"},
        {"content": "is."},
        {},
    ]


def test_without_tags_qwen3_leaves_the_text_as_content() -> None:
    """As with chat_template_kwargs {"enable_thinking": false}: no <think>, all content."""
    pieces = ["Paris", " </think>", " is", " <3"]
    client = client_for(FakeEngine(outputs(pieces)), "qwen3")
    body = {"chat_template_kwargs": {"enable_thinking": False}}
    (choice,) = post(client, **body).json()["choices"]
    assert choice["message"] == {
        "role": "assistant",
        "content": "".join(pieces),
        "reasoning_content": None,
    }
    got = chunks(post(client, stream=True, **body))
    assert [c["delta"] for c in got] == [{"role": "assistant", "content": ""},
        *({"content": p} for p in pieces), {}]  # fmt: skip


def test_a_piece_of_a_tag_the_output_ends_in_is_text() -> None:
    """Held back while it could be <think>, then sent at the end (through the tool-call
    watch, with tools): the whole answer's content, as sent."""
    client = client_for(FakeEngine(outputs(["Paris", " <thi"])), "qwen3", "hermes")
    (choice,) = post(client, tools=TOOLS).json()["choices"]
    assert choice["message"] == {"role": "assistant", "content": "Paris <thi",
                                 "reasoning_content": None}  # fmt: skip
    got = chunks(post(client, tools=TOOLS, stream=True))
    assert [c["delta"] for c in got[1:]] == [
        {"content": "Paris"}, {"content": " "}, {"content": "<thi"}, {}]  # fmt: skip
    assert got[-1]["finish_reason"] == "stop"


def test_calls_are_read_in_the_content_only() -> None:
    """A call written while reasoning stays reasoning; one in the content is a call."""
    pieces = ["Maybe ", CALL_TEXT, " first.", "</think>", "\n\n", CALL_TEXT]
    client = client_for(FakeEngine(outputs(pieces)), "deepseek_r1", "hermes")
    (choice,) = post(client, tools=TOOLS).json()["choices"]
    (call,) = choice["message"].pop("tool_calls")
    assert re.fullmatch(TOOL_ID, call.pop("id"))
    assert call == CALL
    assert choice["message"] == {
        "role": "assistant",
        "content": None,  # (only whitespace around the call)
        "reasoning_content": f"Maybe {CALL_TEXT} first.",
    }
    assert choice["finish_reason"] == "tool_calls"
    got = chunks(post(client, tools=TOOLS, stream=True))
    call_id = got[4]["delta"]["tool_calls"][0]["id"]
    assert [c["delta"] for c in got] == [
        {"role": "assistant", "content": ""},
        {"reasoning_content": "Maybe "},
        {"reasoning_content": CALL_TEXT},
        {"reasoning_content": " first."},
        {"tool_calls": [{"index": 0, "id": call_id, **CALL}]},
        {},
    ]
    assert got[-1]["finish_reason"] == "tool_calls"


def test_a_call_only_in_the_reasoning_is_no_call() -> None:
    client = client_for(
        FakeEngine(outputs([CALL_TEXT, "</think>", "Sunny."])), "deepseek_r1", "hermes"
    )
    (choice,) = post(client, tools=TOOLS).json()["choices"]
    message = {"role": "assistant", "content": "Sunny.", "reasoning_content": CALL_TEXT}
    assert choice["message"] == message and choice["finish_reason"] == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_a_guided_output_is_left_alone(stream: bool) -> None:
    """The guide holds the output from its first token: no reasoning of the model's own, so
    deepseek_r1 does not read a guided output (without </think>) as all reasoning."""
    client = client_for(FakeEngine(outputs(["Par", "is"])), "deepseek_r1")
    r = post(client, guided_choice=["Paris", "Rome"], stream=stream)
    if stream:
        assert [c["delta"] for c in chunks(r)[1:]] == [{"content": "Par"}, {"content": "is"}, {}]
    else:
        assert r.json()["choices"][0]["message"] == {
            "role": "assistant",
            "content": "Paris",
            "reasoning_content": None,
        }


def test_a_forced_call_is_left_alone() -> None:
    client = client_for(FakeEngine(outputs(['{"city": ', '"Paris"}'])), "deepseek_r1")
    choice_ = {"type": "function", "function": {"name": "get_weather"}}
    (choice,) = post(client, tools=TOOLS, tool_choice=choice_).json()["choices"]
    (call,) = choice["message"].pop("tool_calls")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert choice["message"] == {"role": "assistant", "content": None, "reasoning_content": None}
    got = chunks(post(client, tools=TOOLS, tool_choice=choice_, stream=True))
    assert [list(c["delta"]) for c in got] == [["role", "content"], ["tool_calls"], []]


def test_n_logprobs_and_usage_are_those_of_the_whole_output() -> None:
    """The scripted engine's choices write "<10><20>..." (no </think>): under deepseek_r1 all
    reasoning, every other field as without a parser, whole and streamed."""
    body = {"n": 2, "max_tokens": 3, "logprobs": True, "top_logprobs": 1}
    plain = post(client_for(FakeEngine(), None), **body).json()
    split = post(client_for(FakeEngine(), "deepseek_r1"), **body).json()
    for before, after in zip(plain["choices"], split["choices"], strict=True):
        text = before.pop("message")["content"]
        assert after.pop("message") == {"role": "assistant", "content": None,
                                        "reasoning_content": text}  # fmt: skip
        assert after == before
    assert split["usage"] == plain["usage"] == {
        "prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}  # fmt: skip
    opts = {"stream": True, "stream_options": {"include_usage": True}}
    plain = events(post(client_for(FakeEngine(), None), **body, **opts))
    split = events(post(client_for(FakeEngine(), "deepseek_r1"), **body, **opts))
    for event in plain:  # each token's text "<10>", ...: reasoning under deepseek_r1
        for c in event["choices"]:
            if c["delta"].get("content", "").startswith("<"):
                c["delta"] = {"reasoning_content": c["delta"]["content"]}
    assert split == plain
    assert sum("reasoning_content" in c["delta"] for e in split for c in e["choices"]) == 6


def test_beam_search_choices_are_split() -> None:
    """As vLLM's chat route: each beam's message is split (/v1/completions: never)."""
    words = {1: "Hm", 2: ".", 3: "</think>", 4: "Paris", 0: "<eos>"}

    class Engine:
        tokenizer = SimpleNamespace(
            decode=lambda ids, skip_special_tokens: "".join(words[i] for i in ids)
        )
        inputs = SimpleNamespace(limits=SimpleNamespace(eos_token_ids={0}))

        async def beam_search(self, prompts, params, *, priority: int = 0):
            ends = {"stop": [1, 2, 3, 4, 0], "length": [1, 1]}  # (after a one-token prompt)
            beams = [
                BeamSearchSequence([*prompts[0], *tokens], finish_reason=end, num_prompt_tokens=1)
                for end, tokens in ends.items()
            ]
            return [BeamSearchOutput(beams)]

    async def never_gone() -> dict:
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    body = ChatCompletionRequest(messages=ABC, n=2, use_beam_search=True)
    env = fmt.Envelope("chat.completion", "chatcmpl-1", "m")
    params = [beam_route.beam_params(body, 5)]
    answer = beam_route.answer(Engine(), body, [[9]], params, env, never_gone, True,
                               REASONING_PARSERS["deepseek_r1"])  # fmt: skip
    out = asyncio.run(answer)
    assert [c["message"] for c in out["choices"]] == [
        {"role": "assistant", "content": "Paris", "reasoning_content": "Hm."},
        {"role": "assistant", "content": None, "reasoning_content": "HmHm"},
    ]
    assert [c["finish_reason"] for c in out["choices"]] == ["stop", "length"]


def test_completions_are_never_split() -> None:
    pieces = ["Hm", "</think>", "Paris"]
    client = client_for(FakeEngine(outputs(pieces)), "deepseek_r1")
    r = client.post("/v1/completions", json={"prompt": "a b c"})
    assert r.json()["choices"][0]["text"] == "Hm</think>Paris"


def test_a_server_with_an_unknown_parser_does_not_start() -> None:
    with pytest.raises(ValueError, match=r"^reasoning_parser must be one of deepseek_r1, qwen3"):
        client_for(FakeEngine(), "granite")
