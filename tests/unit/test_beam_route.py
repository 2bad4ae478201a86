"""The routes' beam search (serving/beam_route.py) on a recording engine: each prompt is
searched with its own max_tokens (a null max_tokens fitted to that prompt, as vLLM's), and
its choices are indexed p * n + i."""

import asyncio
from types import SimpleNamespace

import pytest

from vllm_runner.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from vllm_runner.serving import beam_route
from vllm_runner.serving import openai_format as fmt
from vllm_runner.serving.protocol import CompletionRequest

EOS = 0


class _Engine:
    """Answers each prompt's search with n sequences of max_tokens tokens (the prompt's
    last id repeated), and records the (prompts, params) of each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[list[int]], BeamSearchParams]] = []
        self.inputs = SimpleNamespace(limits=SimpleNamespace(eos_token_ids={EOS}))
        self.tokenizer = None

    async def beam_search(self, prompts, params, *, priority: int = 0):
        self.calls.append((prompts, params))
        await asyncio.sleep(0)
        return [
            BeamSearchOutput([BeamSearchSequence([*p, *[p[-1]] * params.max_tokens],
                                                 finish_reason="length", num_prompt_tokens=len(p))
                              for _ in range(params.beam_width)])
            for p in prompts
        ]  # fmt: skip


async def _never_gone() -> dict:
    await asyncio.sleep(3600)
    return {"type": "http.disconnect"}


def _answer(engine: _Engine, body: CompletionRequest, ids: list[list[int]], rooms: list[int]):
    params = [beam_route.beam_params(body, room) for room in rooms]
    env = fmt.Envelope("text_completion", "cmpl-1", "m")
    return asyncio.run(beam_route.answer(engine, body, ids, params, env, _never_gone))


def test_each_prompt_is_searched_with_its_own_max_tokens() -> None:
    """max_tokens null: a 3-token prompt has room for 7, a 6-token one for 4 (max_model_len
    10); the short prompt's search is not cut to the long one's room."""
    engine, body = _Engine(), CompletionRequest(prompt=["a", "b"], n=2, use_beam_search=True)
    ids = [[5, 6, 7], [8, 9, 1, 2, 3, 4]]
    out = _answer(engine, body, ids, [7, 4])
    assert sorted((p, c.max_tokens, c.beam_width) for (p,), c in engine.calls) == [
        ([5, 6, 7], 7, 2),
        ([8, 9, 1, 2, 3, 4], 4, 2),
    ]
    choices = out["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert [c["text"] for c in choices] == ["token_id:7" * 7] * 2 + ["token_id:4" * 4] * 2
    assert out["usage"] == {"prompt_tokens": 9, "completion_tokens": 2 * 7 + 2 * 4,
                            "total_tokens": 9 + 22}  # fmt: skip


class _FailingEngine(_Engine):
    """The first prompt's search fails at once; the other's runs until cancelled."""

    def __init__(self) -> None:
        super().__init__()
        self.cancelled = 0

    async def beam_search(self, prompts, params, *, priority: int = 0):
        if prompts == [[1]]:
            raise ValueError("no room for max_tokens")
        try:  # (long enough to be cancelled; not forever, should it not be)
            await asyncio.sleep(2)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


def test_a_failing_search_cancels_the_others() -> None:
    engine, body = _FailingEngine(), CompletionRequest(prompt=["a", "b"], use_beam_search=True)
    with pytest.raises(ValueError, match="no room for max_tokens"):
        _answer(engine, body, [[1], [2]], [3, 3])
    assert engine.cancelled == 1


class _EndingEngine(_Engine):
    """Each prompt's one sequence: one token, then the end token (finish_reason "stop")."""

    async def beam_search(self, prompts, params, *, priority: int = 0):
        return [BeamSearchOutput([BeamSearchSequence([*p, 7, EOS], finish_reason="stop",
                                                     num_prompt_tokens=len(p))])
                for p in prompts]  # fmt: skip


def test_a_sequence_that_ends_is_answered_without_its_end_token() -> None:
    """Its text leaves the end token out even where special tokens are shown (no tokenizer:
    each token by its id); usage counts it, as generated."""
    body = CompletionRequest(prompt="a", use_beam_search=True, skip_special_tokens=False)
    out = _answer(_EndingEngine(), body, [[5, 6]], [4])
    assert [(c["text"], c["finish_reason"]) for c in out["choices"]] == [("token_id:7", "stop")]
    assert out["usage"]["completion_tokens"] == 2
