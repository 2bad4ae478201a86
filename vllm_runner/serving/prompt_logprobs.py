"""vLLM's ``prompt_logprobs`` on the OpenAI routes, in vLLM's shape: one entry per prompt
token, the first ``None`` (nothing precedes it), each other ``{token id: {"logprob", "rank",
"decoded_token"}}`` for the prompt's own token (first) and the ``prompt_logprobs`` most likely
tokens there (token ids are JSON's string keys). ``rank`` is 1 for the most likely token;
the prompt token's counts every token at least as likely (it included), as vLLM's.

The engine scores a prompt once for both readers of its logprobs, this field and a
completion's ``echo`` with ``logprobs``, listing the larger of their top-k: ``kept`` gives
each its own.
"""

from __future__ import annotations

from typing import Any

from vllm_runner.serving.openai_format import TokenDecoder

Entry = dict[int, float]  # the engine's, per position: {token id: logprob}


def engine_top_k(*asked: int | None) -> int | None:
    """The top-k the engine lists for the prompt: the most any reader asked (None: none)."""
    given = [k for k in asked if k is not None]
    return max(given) if given else None


def ranked(entry: Entry, k: int) -> list[tuple[int, float]]:
    """The ``k`` most likely tokens of ``entry``, most likely first."""
    return sorted(entry.items(), key=lambda kv: -kv[1])[:k]


def kept(entry: Entry, token: int, k: int) -> Entry:
    """``entry`` with the prompt ``token`` and its ``k`` most likely tokens only."""
    return {token: entry[token], **dict(ranked(entry, k))}


def prompt_logprobs_field(
    decode: TokenDecoder,
    ids: list[int],
    logprobs: list[Entry | None] | None,
    ranks: list[int | None] | None,
    k: int,
) -> list[dict[str, dict[str, Any]] | None]:
    """The field for the prompt ``ids`` from the engine's ``logprobs`` and ``ranks`` (one
    entry per token, the first None)."""
    if logprobs is None or ranks is None or not len(logprobs) == len(ranks) == len(ids):
        got = None if logprobs is None or ranks is None else (len(logprobs), len(ranks))
        raise RuntimeError(f"the engine sent no prompt logprobs for {len(ids)} tokens, got {got}")

    def text(tid: int) -> str | None:  # (as vLLM's without a tokenizer: none)
        return decode(tid) if decode.tokenizer is not None else None

    out: list[dict[str, dict[str, Any]] | None] = [None]
    for token, entry, rank in zip(ids[1:], logprobs[1:], ranks[1:], strict=True):
        shown = {token: (entry[token], rank)}
        # NOTE: as vLLM's, the prompt token among the top k has its place there as its rank
        shown.update((t, (lp, place)) for place, (t, lp) in enumerate(ranked(entry, k), 1))
        out.append({str(t): {"logprob": lp, "rank": r, "decoded_token": text(t)}
                    for t, (lp, r) in shown.items()})  # fmt: skip
    return out
