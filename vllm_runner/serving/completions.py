"""POST /v1/completions' answers (OpenAI's legacy completions), whole or streamed.

With ``echo`` each choice's text starts with the prompt's (a token-id prompt's decoded text)
and, with ``logprobs``, its logprobs with the prompt's tokens: the engine's prompt_logprobs,
the first token's null (nothing precedes it). ``max_tokens`` 0 (echo only, as vLLM) answers
the prompt alone: the engine samples one token, which is dropped here.
``return_tokens_as_token_ids`` names every logprobs token by id, the echoed prompt's too;
the text, echoed or generated, stays text. vLLM's ``prompt_logprobs`` (not streamed) give
each choice its prompt's, in vLLM's shape (``prompt_logprobs.py``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import Any

from vllm_runner.sampling_params import SamplingParams
from vllm_runner.serving import openai_format as fmt
from vllm_runner.serving.prompt_logprobs import kept, prompt_logprobs_field
from vllm_runner.serving.protocol import CompletionRequest
from vllm_runner.serving.streams import Choice, events, gather, until_disconnect

logger = logging.getLogger(__name__)
Logprobs = list[dict[int, float] | None]


def echoed_prompts(
    decode: fmt.TokenDecoder, body: CompletionRequest, ids: list[list[int]]
) -> list[str]:
    """Each prompt's text as its choices echo it: as sent, or a token-id prompt's decoded
    text (all empty without echo)."""
    if not body.echo:
        return [""] * len(ids)
    texts = []
    for prompt, prompt_ids in zip(body.prompts(), ids, strict=True):
        if isinstance(prompt, str):
            texts.append(prompt)
        elif decode.tokenizer is None:  # (the tokens' own names, as their logprobs show them)
            texts.append("".join(map(decode, prompt_ids)))
        else:
            texts.append(decode.tokenizer.decode(prompt_ids))
    return texts


def prompt_logprobs(
    decode: fmt.TokenDecoder, ids: list[int], logprobs: Logprobs | None, k: int
) -> dict[str, Any]:
    """The legacy logprobs of the prompt's tokens (``logprobs``: the engine's
    prompt_logprobs, one entry per token, the first None), each with its top ``k``."""
    if logprobs is None or len(logprobs) != len(ids):
        got = None if logprobs is None else len(logprobs)
        raise RuntimeError(f"the engine sent no prompt logprobs for {len(ids)} tokens, got {got}")
    after_head = len(decode(ids[0]))  # (in the text: the first token's name may be its id)
    tops = [kept(lp, t, k) for lp, t in zip(logprobs[1:], ids[1:], strict=True)]  # type: ignore[arg-type]
    rest = fmt.completion_logprobs(decode, ids[1:], tops, after_head)
    return {
        "tokens": [decode.token(ids[0]), *rest["tokens"]],
        "token_logprobs": [None, *rest["token_logprobs"]],
        "top_logprobs": [None, *rest["top_logprobs"]],
        "text_offset": [0, *rest["text_offset"]],
    }


def joined(first: dict[str, Any], then: dict[str, Any]) -> dict[str, Any]:
    return {k: first[k] + then[k] for k in first}


def dropped(out: Any) -> Any:
    """A max_tokens 0 request's update without the one token the engine sampled."""
    return dataclasses.replace(
        out,
        delta="",
        text="",
        num_token_ids=0,
        new_token_ids=[],
        new_logprobs=[] if out.new_logprobs is not None else None,
        finish_reason="length",
        stop_reason=None,
    )


async def answer(
    engine: Any,
    body: CompletionRequest,
    ids: list[list[int]],
    params: list[SamplingParams],
    env: fmt.Envelope,
    receive: Any,
) -> Any:
    """The whole answer (or the client-gone error, if it left first)."""
    results = await until_disconnect(
        receive, gather(engine, ids, params, env.request_id, body.priority)
    )
    if results is None:
        return fmt.CLIENT_GONE.response()
    decode = fmt.TokenDecoder(engine.tokenizer, body.return_tokens_as_token_ids)
    echoes = echoed_prompts(decode, body, ids)
    asked = body.prompt_logprobs
    # each prompt's, from its first choice: every choice of it carries the same list
    fields = [
        None if asked is None else prompt_logprobs_field(
            decode, ids[p], cs[0].prompt_logprobs, cs[0].prompt_ranks, asked
        )
        for p, (_, cs) in enumerate(results)
    ]  # fmt: skip

    def choice(p: int, c: Choice) -> dict[str, Any]:
        if body.max_tokens == 0:
            c.text, c.token_ids, c.logprobs = "", [], []
            c.finish_reason, c.stop_reason = "length", None
        lps = None
        if body.logprobs is not None:
            lps = fmt.completion_logprobs(decode, c.token_ids, c.logprobs, len(echoes[p]))
            if body.echo:
                lps = joined(prompt_logprobs(decode, ids[p], c.prompt_logprobs, body.logprobs), lps)
        index = p * body.n + c.index
        out = {"index": index, "text": echoes[p] + c.text, "logprobs": lps, **fmt.finish(c)}
        return out if fields[p] is None else {**out, "prompt_logprobs": fields[p]}

    choices = [choice(p, c) for p, (_, cs) in enumerate(results) for c in cs]
    return env(choices=choices, usage=fmt.results_usage(results))


async def stream(
    engine: Any,
    body: CompletionRequest,
    ids: list[list[int]],
    params: list[SamplingParams],
    env: fmt.Envelope,
) -> AsyncIterator[str]:
    """The answer as server-sent events: each choice's first chunk carries what it echoes."""
    decode = fmt.TokenDecoder(engine.tokenizer, body.return_tokens_as_token_ids)
    echoes = echoed_prompts(decode, body, ids)
    generated: dict[int, int] = {}
    text_offset: dict[int, int] = {}  # per choice: where its next chunk's tokens start
    try:
        async for p, out in events(engine, ids, params, env.request_id, body.priority):
            if body.max_tokens == 0:
                out = dropped(out)
            index = p * body.n + out.index
            generated[index] = out.num_token_ids
            first = index not in text_offset
            offset = text_offset.setdefault(index, len(echoes[p]))
            lps = None
            if body.logprobs is not None and (out.new_logprobs or (first and body.echo)):
                lps = fmt.completion_logprobs(
                    decode, out.new_token_ids, out.new_logprobs or [], offset
                )
                text_offset[index] = offset + sum(len(decode(t)) for t in out.new_token_ids)
                if first and body.echo:
                    lps = joined(
                        prompt_logprobs(decode, ids[p], out.prompt_logprobs, body.logprobs), lps
                    )
            text = echoes[p] + out.delta if first else out.delta
            if not (text or out.finished or lps):
                continue
            choice = {
                "index": index,
                "text": text,
                "logprobs": lps,
                **fmt.finish(out if out.finished else None),
            }
            usage = fmt.chunk_usage(body, len(ids[p]), generated[index])
            yield fmt.sse(env(choices=[choice], **usage))
        if body.include_usage:
            usage = fmt.usage(sum(len(p) for p in ids), sum(generated.values()))
            yield fmt.sse(env(choices=[], usage=usage))
    except Exception as exc:  # headers are sent: report in-band, as OpenAI does
        logger.exception("stream %s failed", env.request_id)
        yield fmt.sse(fmt.OpenAIError(500, str(exc), "internal_server_error").body())
    yield fmt.DONE
