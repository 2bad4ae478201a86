"""Reasoning on /v1/chat/completions, in-process on the default model (which writes no think
tags) under the setting reasoning_parser: its greedy answer, whole and streamed, is all
reasoning under deepseek_r1 (the template is taken to have opened it) and all content under
qwen3, every other field as without the setting; a guided answer is left alone. The splits
of written tags: tests/unit/test_reasoning_routes.py, on a scripted engine."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from service_testing import CHAT

BODY = {"messages": CHAT, "max_tokens": 8, "temperature": 0, "logprobs": True}


@pytest.fixture
def reasoning(service_module: Any) -> Iterator[Any]:
    """Sets the server's parser, as VLLM_RUNNER_REASONING_PARSER would (None first)."""
    from vllm_runner.serving.reasoning_parsers import get_reasoning_parser

    # NOTE: not monkeypatch.setattr: its undo deletes what a State holds (not in its __dict__)
    state = service_module.openai_app.state
    saved = state.reasoning_parser
    yield lambda name: setattr(state, "reasoning_parser", get_reasoning_parser(name))
    state.reasoning_parser = saved


def _answer(client: Any, **fields: Any) -> dict[str, Any]:
    r = client.post("/v1/chat/completions", json={**BODY, **fields})
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    return {**choice, "usage": r.json()["usage"]}


def _streamed(client: Any, **fields: Any) -> list[dict[str, Any]]:
    body = {**BODY, **fields, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        data = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    return [d["choices"][0] for d in data]


def test_the_default_models_answer_is_split(client: Any, reasoning: Any) -> None:
    reasoning(None)
    plain = _answer(client)
    text = plain["message"]["content"]
    assert text and plain["message"] == {"role": "assistant", "content": text}
    reasoning("qwen3")  # no <think>: content as it is
    assert _answer(client) == {**plain, "message": {**plain["message"], "reasoning_content": None}}
    reasoning("deepseek_r1")  # no </think>: all reasoning
    split = _answer(client)
    assert split == {
        **plain,
        "message": {"role": "assistant", "content": None, "reasoning_content": text},
    }
    reasoning(None)
    plain_chunks = _streamed(client)
    reasoning("deepseek_r1")
    split_chunks = _streamed(client)
    for before, after in zip(plain_chunks[1:], split_chunks[1:], strict=True):
        if before["delta"].get("content"):  # (a token's text: reasoning, in the same chunk)
            before["delta"] = {"reasoning_content": before["delta"]["content"]}
        assert after == before
    assert split_chunks[0] == plain_chunks[0] and len(split_chunks) == len(plain_chunks)
    assert "".join(c["delta"].get("reasoning_content", "") for c in split_chunks) == text


def test_a_guided_answer_is_left_alone(client: Any, reasoning: Any) -> None:
    reasoning("deepseek_r1")
    answer = _answer(client, guided_choice=["Paris", "Rome"])
    assert answer["message"] == {"role": "assistant", "content": "Paris", "reasoning_content": None}
    chunks = _streamed(client, guided_choice=["Paris", "Rome"])
    assert "".join(c["delta"].get("content", "") for c in chunks) == "Paris"
    assert not any("reasoning_content" in c["delta"] for c in chunks)
