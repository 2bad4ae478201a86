"""A scripted stand-in for AsyncLLM, for fast tests of the OpenAI routes' formatting (no model,
no BentoML): each prompt's n choices generate tokens 10 + choice, 20 + choice, ... one a step,
interleaved, each token's text "<id>"; with logprobs each sampled token has -1.0 and token 7
(always more likely) -0.5."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from vllm_runner.engine.outputs import StreamOutput

OTHER, OTHER_LP, SAMPLED_LP = 7, -0.5, -1.0


def token(index: int, step: int) -> int:
    return 10 * (step + 1) + index


def prompt_ids(prompt: str | list[int]) -> list[int]:
    """A text prompt's "token ids": one per word."""
    return (
        list(prompt) if isinstance(prompt, list) else [100 + i for i in range(len(prompt.split()))]
    )


class FakeEngine:
    model_name = "fake-model"
    max_model_len = 64

    def __init__(self, updates: list[StreamOutput] | None = None) -> None:
        self.tokenizer = None
        self.updates = updates  # sent as they are instead of the scripted ones
        self.tokenized: list[tuple[str, bool]] = []
        self.priorities: list[int] = []  # of each stream, in order
        self.params: list[Any] = []  # each stream's SamplingParams, in order
        limits = SimpleNamespace(sampling_defaults={})
        self.inputs = SimpleNamespace(
            limits=limits, fit=lambda ids, p: p, tokenize=self.tokenize, check_priority=int
        )

    def tokenize(self, text: str, chat: bool = False, params: Any = None) -> list[int]:
        self.tokenized.append((text, chat))
        return prompt_ids(text)

    def validate(
        self, prompt: Any, params: Any, chat: bool = False, fit: bool = False
    ) -> list[int]:
        return prompt_ids(prompt)

    def apply_chat_template(self, messages: list[dict], **options: Any) -> str:
        return " ".join(m["content"] for m in messages)

    async def abort(self, request_id: str) -> None:
        pass

    async def stream(
        self, prompt: Any, params: Any, request_id: str = "", priority: int = 0
    ) -> Any:
        self.priorities.append(priority)
        self.params.append(params)
        ids = prompt_ids(prompt)
        if self.updates is not None:
            for out in self.updates:
                yield out
            return
        steps = params.max_tokens
        for step in range(steps):
            for index in range(params.n):
                tid = token(index, step)
                lps = None if params.logprobs is None else [{tid: SAMPLED_LP, OTHER: OTHER_LP}]
                done = step == steps - 1
                yield update(index, f"<{tid}>", [tid], step + 1, done, lps, ids)


def update(
    index: int,
    delta: str,
    ids: list[int],
    total: int,
    finished: bool = False,
    logprobs: list[dict[int, float]] | None = None,
    prompt: list[int] | None = None,
) -> StreamOutput:
    return StreamOutput(
        request_id="r",
        index=index,
        delta=delta,
        text="",
        num_token_ids=total,
        new_token_ids=ids,
        new_logprobs=logprobs,
        finished=finished,
        finish_reason="length" if finished else None,
        prompt_token_ids=prompt or [1, 2, 3],
    )


def outputs(pieces: list[str], index: int = 0, reason: str = "stop") -> list[StreamOutput]:
    """One choice's updates: a token a piece, the last one finishing it for ``reason``."""
    last = len(pieces) - 1
    return [
        StreamOutput(
            "r",
            index,
            p,
            "",
            i + 1,
            [10 + i],
            None,
            i == last,
            reason if i == last else None,
            [1, 2, 3],
        )  # fmt: skip
        for i, p in enumerate(pieces)
    ]
