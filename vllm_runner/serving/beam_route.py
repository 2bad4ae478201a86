"""``use_beam_search`` on the OpenAI routes (vLLM's): ``n`` beams a prompt, the ``n`` best
sequences answered as its choices (``vllm_runner/beam_search.py``).

Beam search ranks the model's raw logprobs: only the settings it takes may be sent with it
(``BEAM_FIELDS``, and any other field at its default); anything else, streaming included,
is refused rather than left unused.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from vllm_runner.beam_search import MAX_LOGPROBS, BeamSearchParams
from vllm_runner.serving import openai_format as fmt
from vllm_runner.serving.reasoning_parsers import ReasoningParser
from vllm_runner.serving.streams import until_disconnect

# what beam search takes or what does not change its output (chat templating, the prompt's
# truncation, the request's bookkeeping; a seed: no token is drawn)
BEAM_FIELDS = {
    "model", "prompt", "messages", "n", "max_tokens", "max_completion_tokens", "ignore_eos",
    "length_penalty", "use_beam_search", "temperature", "user", "priority", "skip_special_tokens",
    "truncate_prompt_tokens", "add_generation_prompt", "continue_final_message",
    "chat_template_kwargs", "chat_template", "seed", "include_stop_str_in_output",
    "return_tokens_as_token_ids",
}  # fmt: skip


def beam_params(body: Any, max_tokens: int) -> BeamSearchParams:
    """The request's beam search (``max_tokens``: its own, or the one fitted to its
    prompt), or a ValueError naming the field it cannot take."""
    fields = type(body).model_fields
    for name in sorted(body.model_fields_set - BEAM_FIELDS):
        value = getattr(body, name)
        if value != fields[name].default:
            raise ValueError(
                f"{name} cannot be combined with use_beam_search, got {value!r} (beam search "
                f"takes n, max_tokens, ignore_eos, length_penalty and temperature 0)"
            )
    if body.n > MAX_LOGPROBS // 2:
        raise ValueError(
            f"n (the number of beams with use_beam_search) must be <= {MAX_LOGPROBS // 2}, "
            f"got {body.n}"
        )
    if not math.isfinite(body.length_penalty):
        raise ValueError(f"length_penalty must be a finite number, got {body.length_penalty!r}")
    sent_temperature = body.temperature if "temperature" in body.model_fields_set else 0.0
    return BeamSearchParams(body.n, max_tokens, body.ignore_eos, sent_temperature,
                            body.length_penalty)  # fmt: skip


async def answer(
    engine: Any,
    body: Any,
    ids: list[list[int]],
    params: list[BeamSearchParams],
    env: fmt.Envelope,
    receive: Any,
    chat: bool = False,
    reasoner: ReasoningParser | None = None,
) -> Any:
    """Every prompt's best sequences as choices (prompt p's i-th best: index p * n + i), or
    the client-gone error if it left first (its beams' requests are aborted). ``params``:
    each prompt's (its max_tokens its own, as vLLM's: a null one is fitted per prompt).
    ``reasoner``: the chat route's reasoning parser, which splits each message as vLLM's
    (beams are never guided: beam_params refuses guided_*)."""
    outputs = await until_disconnect(receive, _searches(engine, ids, params, body.priority))
    if outputs is None:
        return fmt.CLIENT_GONE.response()
    ends = engine.inputs.limits.eos_token_ids
    choices, generated = [], 0
    for p, out in enumerate(outputs):
        for i, seq in enumerate(out.sequences):
            tokens = seq.output_token_ids
            generated += len(tokens)
            shown = tokens[:-1] if seq.finish_reason == "stop" and tokens[-1] in ends else tokens
            text = _decode(engine, shown, body.skip_special_tokens)
            message = {"role": "assistant", "content": text}
            if reasoner is not None:
                split = reasoner.split(text)
                message = {**message, "content": split.content,
                           "reasoning_content": split.reasoning}  # fmt: skip
            content = {"message": message} if chat else {"text": text}
            choices.append({"index": p * body.n + i, **content, "logprobs": None,
                            "finish_reason": seq.finish_reason, "stop_reason": None})  # fmt: skip
    return env(choices=choices, usage=fmt.usage(sum(map(len, ids)), generated))


async def _searches(
    engine: Any, ids: list[list[int]], params: list[BeamSearchParams], priority: int
) -> list[Any]:
    """Each prompt's search, run side by side (the engine batches their rounds); one that
    fails (or the whole, cancelled) cancels the others, whose requests are then aborted."""
    tasks = [asyncio.ensure_future(engine.beam_search([p], bp, priority=priority))
             for p, bp in zip(ids, params, strict=True)]  # fmt: skip
    try:
        return [out for (out,) in await asyncio.gather(*tasks)]
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _decode(engine: Any, tokens: list[int], skip_special_tokens: bool) -> str:
    tokenizer = engine.tokenizer
    if tokenizer is None:  # (the tokens' own names, as their logprobs show them)
        return "".join(map(fmt.TokenDecoder(None), tokens))
    return tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)
