"""Request models' defaults and bounds (as OpenAI's API and vLLM's server take them), and the
adaptive-batched routes' per-item handling of a refused or failed item. No model needed."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError

from vllm_runner.engine.errors import RequestError
from vllm_runner.serving.batched import complete_result, generate_valid, prepared, score_result
from vllm_runner.serving.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest

HI = [{"role": "user", "content": "hi"}]
# request fields (OpenAI's and vLLM's) whose null means the default
NULLABLE = ("temperature", "top_p", "top_k", "min_p", "n", "stream", "presence_penalty",
            "frequency_penalty", "repetition_penalty", "ignore_eos", "min_tokens", "logprobs",
            "include_stop_str_in_output", "skip_special_tokens", "add_generation_prompt",
            "continue_final_message", "echo", "seed", "stop", "stop_token_ids", "user")  # fmt: skip


def test_max_tokens_defaults() -> None:
    """OpenAI's legacy completions (and vLLM's) default to 16 tokens; chat has no default
    limit (vLLM: what max_model_len leaves the prompt)."""
    assert CompletionRequest(prompt="hi").completion_sampling_params({}).max_tokens == 16
    assert ChatCompletionRequest(messages=HI).chat_sampling_params({}).max_tokens is None


@pytest.mark.parametrize(
    ("model", "body"),
    [(CompletionRequest, {"prompt": "hi"}), (ChatCompletionRequest, {"messages": HI})],
)
def test_null_fields_take_their_defaults(model: Any, body: dict) -> None:
    """As vLLM's models (clients send null for an unset argument): null is the default."""
    nulls = dict.fromkeys(n for n in NULLABLE if n in model.model_fields)
    assert model.model_validate({**body, **nulls}) == model.model_validate(body)


@pytest.mark.parametrize(
    ("model", "body", "field", "largest"),
    [
        (CompletionRequest, {"prompt": "hi"}, "logprobs", 20),  # vLLM's max_logprobs
        (ChatCompletionRequest, {"messages": HI, "logprobs": True}, "top_logprobs", 20),  # OpenAI
    ],
)
def test_logprobs_bounds(model: Any, body: dict, field: str, largest: int) -> None:
    assert getattr(model.model_validate({**body, field: largest}), field) == largest
    with pytest.raises(ValidationError) as refused:
        model.model_validate({**body, field: largest + 1})
    assert refused.value.errors()[0]["loc"] == (field,)


@pytest.mark.parametrize("best_of", [1, 3])
def test_best_of_other_than_n_is_refused(best_of: int) -> None:
    """best_of (n candidates, the best n kept) is not implemented: any value but n would be
    answered as if it were n."""
    with pytest.raises(ValidationError, match=f"best_of must equal n \\(2\\).*got {best_of}"):
        CompletionRequest(prompt="hi", n=2, best_of=best_of)
    assert CompletionRequest(prompt="hi", n=2, best_of=2).n == 2


def test_a_developer_message_reads_as_a_system_message() -> None:
    """OpenAI: developer messages replace system messages; templates know only "system"."""
    message = ChatMessage(role="developer", content="Be brief.")
    assert message.as_dict() == {"role": "system", "content": "Be brief."}


def test_only_an_assistant_message_may_leave_its_content_out() -> None:
    """OpenAI's (and vLLM's) assistant message may be sent with content null; no other."""
    assert ChatMessage(role="assistant", content=None).as_dict()["role"] == "assistant"
    with pytest.raises(ValidationError, match="a user message needs content"):
        ChatMessage(role="user", content=None)


def test_a_refused_or_failed_item_answers_alone() -> None:
    refused = complete_result(ValueError("prompt is empty"), ValueError("prompt is empty"))
    assert refused.model_dump() == {
        "text": "",
        "finish_reason": "error",
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "error": "prompt is empty",
        "stop_reason": None,
    }
    failed = complete_result(RequestError("request 7 failed: boom"), [5, 6, 7])
    assert (failed.finish_reason, failed.prompt_tokens, failed.error) == (
        "error",
        3,
        "request 7 failed: boom",
    )


def test_one_engine_call_for_the_valid_items_and_a_failed_one_alone() -> None:
    good = SimpleNamespace(text="ok")
    failure = RequestError("request b failed: boom")
    calls: list[list] = []

    class Engine:
        async def generate(self, prompts: list, params: list, priority: list) -> list:
            calls.append((prompts, params, priority))
            raise RequestError(str(failure), [good, failure])

    refused = ValueError("prompt is empty")
    outs = asyncio.run(
        generate_valid(Engine(), [[1], refused, [2]], ["p1", "p2", "p3"], [-1, 5, 2])
    )
    assert calls == [([[1], [2]], ["p1", "p3"], [-1, 2])]
    assert outs == [good, refused, failure]


def test_an_item_that_fails_to_prepare_is_refused_alone() -> None:
    items = [SimpleNamespace(_ids=None, prompt=p) for p in ("a", "", "b")]

    def prepare(item: Any) -> list[int]:
        if not item.prompt:
            raise ValueError("prompt is empty")
        return [ord(item.prompt)]

    first, second, third = asyncio.run(prepared(items, prepare))
    assert (first, third) == ([97], [98])
    assert isinstance(second, ValueError) and str(second) == "prompt is empty"


def test_a_refused_or_failed_score_item_answers_alone() -> None:
    """A refused item was not tokenized (0 tokens); a failed one names its continuation's."""
    refused = score_result(ValueError("continuation has no tokens"), ValueError("x"))
    failed = score_result(RequestError("request 3 failed: boom"), ([1, 2, 3, 4], 2))
    assert refused.model_dump() == {
        "logprob": None,
        "num_tokens": 0,
        "token_logprobs": [],
        "error": "continuation has no tokens",
    }
    assert failed.model_dump() == {
        "logprob": None,
        "num_tokens": 2,
        "token_logprobs": [],
        "error": "request 3 failed: boom",
    }
