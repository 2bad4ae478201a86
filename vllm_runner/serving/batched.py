"""The adaptive-batched routes' work (POST /complete, POST /score): each item prepared for the
engine or refused on its own, one engine call for a batch, and per-item results."""

from __future__ import annotations

import asyncio
from typing import Any

from vllm_runner import AsyncLLM, RequestError, SamplingParams
from vllm_runner.serving.protocol import CompleteResult, ScoreRequest, ScoreResult

PARSE_TIME_CHARS = 8192  # ~ms of tokenizing: longer texts wait for the handler's thread


def score_params() -> SamplingParams:
    # prompt_logprobs=0: the log-probability of each prompt token itself, no others
    return SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)


def fitted_params(engine: AsyncLLM, params: SamplingParams, ids: Any) -> SamplingParams:
    """``params`` with a missing max_tokens fitted to the prompt ``ids`` (a refused one, a
    ValueError: as they are)."""
    return params if isinstance(ids, ValueError) else engine.inputs.fit(ids, params)


def short_texts(*prompts: Any) -> bool:
    """Texts this short are tokenized while BentoML parses the request (a 400 of their own);
    longer ones in the handler, in a thread, since parsing holds the worker's event loop."""
    return sum(len(p) for p in prompts if isinstance(p, str)) <= PARSE_TIME_CHARS


async def prepared(items: list[Any], prepare: Any) -> list[Any]:
    """Each item's engine input (``item._ids``, or ``prepare(item)`` in a thread where
    parsing left it undone), or the ValueError that refuses it."""
    if all(item._ids is not None for item in items):
        return [item._ids for item in items]

    def run() -> list[Any]:
        out: list[Any] = []
        for item in items:
            try:
                out.append(item._ids if item._ids is not None else prepare(item))
            except ValueError as exc:
                out.append(exc)
        return out

    return await asyncio.to_thread(run)


async def generate_valid(
    engine: AsyncLLM, inputs: list[Any], params: list[Any], priorities: list[int]
) -> list[Any]:
    """The engine's output for each valid input, a RequestError where it failed one; a
    refused input keeps its ValueError. One engine call for the valid ones."""
    outs = list(inputs)
    valid = [i for i, x in enumerate(inputs) if not isinstance(x, ValueError)]
    if valid:
        try:
            results = await engine.generate(
                [inputs[i] for i in valid],
                [params[i] for i in valid],
                priority=[priorities[i] for i in valid],
            )
        except RequestError as exc:
            if exc.results is None:
                raise
            results = exc.results  # a failed item answers with its error, the others as usual
        for i, out in zip(valid, results, strict=True):
            outs[i] = out
    return outs


def score_ids(engine: AsyncLLM, item: ScoreRequest) -> tuple[list[int], int]:
    """Prompt and continuation tokenized separately, then joined (joint tokenization can
    merge tokens across the boundary); returns (ids, number of continuation tokens)."""
    prompt = engine.validate(item.prompt, score_params())
    cont = item.continuation
    if isinstance(cont, str):
        if engine.tokenizer is None:
            raise ValueError("continuation must be token ids: the model has no tokenizer")
        engine.check_text_length(cont, "continuation")
        cont = engine.tokenizer.encode(cont, add_special_tokens=False)
    if not cont:
        raise ValueError("continuation has no tokens")
    # NOTE: checked here, not only joined: the engine would name the continuation "prompt"
    vocab = engine.inputs.limits.vocab_size
    if (bad := next((t for t in cont if not 0 <= t < vocab), None)) is not None:
        raise ValueError(f"continuation token id {bad} is outside the vocabulary [0, {vocab})")
    if len(prompt) + len(cont) >= engine.max_model_len:
        raise ValueError(
            f"prompt ({len(prompt)} tokens) + continuation ({len(cont)} tokens) do not fit: "
            f"max_model_len is {engine.max_model_len} (they and one new token must fit)"
        )
    return engine.validate(prompt + list(cont), score_params()), len(cont)


def complete_result(out: Any, prompt_ids: Any) -> CompleteResult:
    if isinstance(out, RequestError | ValueError):  # failed, or refused in the handler
        return CompleteResult(
            text="",
            finish_reason="error",
            prompt_tokens=0 if isinstance(out, ValueError) else len(prompt_ids),
            completion_tokens=0,
            error=str(out),
        )
    return CompleteResult(
        text=out.text,
        finish_reason=out.finish_reason,
        prompt_tokens=len(out.prompt_token_ids),
        completion_tokens=len(out.token_ids),
        stop_reason=out.outputs[0].stop_reason,
    )


def score_result(out: Any, ids_and_k: Any) -> ScoreResult:
    if isinstance(out, RequestError | ValueError):  # failed, or refused in the handler
        k = 0 if isinstance(out, ValueError) else ids_and_k[1]
        return ScoreResult(logprob=None, num_tokens=k, token_logprobs=[], error=str(out))
    k = ids_and_k[1]
    tail = zip(out.prompt_logprobs[-k:], out.prompt_token_ids[-k:], strict=True)
    lps = [top[token] for top, token in tail]
    return ScoreResult(logprob=sum(lps), num_tokens=k, token_logprobs=lps)
