"""Paged attention entry point for the model: the decode kernel for pure-decode batches, else
the prefill kernel."""

import torch

from kernels.paged_attention import NewTokens, paged_attention_decode
from kernels.prefill_attention import prefill_attention


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_reqs, max_blocks] int32
    seq_lens: torch.Tensor,  # [num_reqs] int32: context length incl. this step's tokens
    query_start_loc: torch.Tensor,  # [num_reqs + 1] int32: cumulative query lengths
    scale: float,
    max_query_len: int,
    max_seq_len: int | None = None,
    num_decode_rows: int = 0,
    new_tokens: NewTokens | None = None,
    decode_order: torch.Tensor | None = None,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim], contiguous
    prefill_query_start_loc: torch.Tensor | None = None,
    sliding_window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Same semantics as ``kernels.reference.paged_attention``; ``max_query_len`` is a host int.

    With ``max_query_len == 1`` every request has exactly one query (``num_tokens == num_reqs``)
    and the GQA / split-K decode kernel runs; ``max_seq_len`` (host int, optional) only tunes
    its split count. Otherwise the tiled varlen prefill kernel runs, except for the first
    ``num_decode_rows`` requests (host int), known to have one query each: those go through
    the decode kernel, which reads each KV block once per GQA group instead of once per head.
    ``new_tokens`` (decode only): the query is not yet rotated, the kernel rotates it and
    writes the new keys / values itself (``paged_attention_decode``). ``decode_order``: the
    decode rows, longest context first (``paged_attention_decode``'s ``order``). ``out``:
    written and returned instead of a new tensor. ``prefill_query_start_loc``: the prefill
    rows' ``query_start_loc[num_decode_rows:] - num_decode_rows``, if the caller has it (a
    step computes it once for all its layers). ``sliding_window`` / ``softcap`` (0: off): the
    layer's window and score cap, as the reference takes them.
    """
    opts = {"sliding_window": sliding_window, "softcap": softcap}
    num_reqs = seq_lens.shape[0]
    if max_query_len == 1:
        assert query.shape[0] == num_reqs, (
            f"decode needs one query per request: {query.shape[0]} tokens, {num_reqs} requests"
        )
        return paged_attention_decode(
            query, k_cache, v_cache, block_tables, seq_lens, scale, max_seq_len=max_seq_len,
            new_tokens=new_tokens, order=decode_order, out=out, **opts,
        )  # fmt: skip
    assert new_tokens is None, f"new_tokens needs a decode step, got max_query_len {max_query_len}"
    d = num_decode_rows
    if d == 0:
        return prefill_attention(
            query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, out=out,
            **opts,
        )  # fmt: skip
    if out is None:
        out = torch.empty_like(query, memory_format=torch.contiguous_format)
    paged_attention_decode(
        query[:d],
        k_cache,
        v_cache,
        block_tables[:d],
        seq_lens[:d],
        scale,
        max_seq_len=max_seq_len,
        out=out[:d],
        order=decode_order,
        **opts,
    )
    prefill_attention(
        query[d:],
        k_cache,
        v_cache,
        block_tables[d:],
        seq_lens[d:],
        query_start_loc[d:] - d if prefill_query_start_loc is None else prefill_query_start_loc,
        scale,
        out=out[d:],
        **opts,
    )
    return out
