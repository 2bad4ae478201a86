"""Varlen causal attention over the paged KV cache (Triton): prefill, chunked prefill, prefix hits.

Same contract as ``kernels.reference.paged_attention``: request ``r``'s queries are the last
``q_len`` positions of its ``seq_len`` tokens and its K/V (including this step's, already
written by ``write_kv_cache``) are read from the cache through its block table. Each program
computes one ``BLOCK_M``-token tile of one request's queries for ``GROUP`` query heads of one
kv head (GQA: they share every K/V tile it loads), sweeping keys in ``BLOCK_N`` tiles with
``tl.dot``: first the keys every row of the tile may see (no mask), then the diagonal tiles
(causal mask). Under a sliding window (SLIDING) the tiles before the tile's first window are
skipped, those holding some row's window edge masked, and the diagonal tiles take both masks.
"""

import torch
import triton
import triton.language as tl

from kernels.attention_tile import (
    attend_tile,
    check_paged_inputs,
    check_score_options,
    dot_dtype_query,
    dot_precision,
    fp16_dots,
    output_buffer,
    score_args,
)
from kernels.launch import next_power_of_2

_MAX_GRID_Y = 65535  # CUDA's limit on a grid's second dimension


@triton.jit
def _find_request(query_start_loc_ptr, num_reqs, pid, BLOCK_M: tl.constexpr):
    """Largest ``r`` with ``query_start_loc[r] // BLOCK_M + r <= pid`` (binary search).

    Request ``r``'s query tiles are numbered from ``query_start_loc[r] // BLOCK_M + r``; that
    leaves room for its ``cdiv(q_len, BLOCK_M)`` tiles without any host-side bookkeeping.
    """
    # NOTE: both bounds are int32 tensors so the loop-carried types never change.
    lo = tl.full([], 0, tl.int32)
    hi = lo + (num_reqs - 1)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        first_tile = tl.load(query_start_loc_ptr + mid).to(tl.int32) // BLOCK_M + mid
        if first_tile <= pid:
            lo = mid
        else:
            hi = mid - 1
    return lo


# NOTE: no specialization on values that change every step (request count; seq_lens and
# block_tables start at an arbitrary row when decode rows are split off): each new
# specialization would be a fresh compile in the middle of serving.
@triton.jit(do_not_specialize=["block_tables_ptr", "seq_lens_ptr", "num_reqs"])
def _prefill_kernel(
    q_ptr,  # [num_tokens, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,
    block_tables_ptr,  # [num_reqs, max_blocks]
    seq_lens_ptr,  # [num_reqs]
    query_start_loc_ptr,  # [num_reqs + 1]
    out_ptr,  # [num_tokens, num_heads, head_dim]
    qk_scale,
    window,  # SLIDING only: a query at position p sees keys (p - window, p]
    softcap,  # SOFTCAP only (attention_tile.score_args)
    num_reqs,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    stride_cb,
    stride_cs,
    stride_ch,
    QUERIES_PER_KV: tl.constexpr,
    GROUP: tl.constexpr,  # query heads per program (2^k dividing QUERIES_PER_KV): share K/V tiles
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query tokens per tile: BLOCK_M * GROUP rows
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FP16_DOTS: tl.constexpr,  # paged_attention.fp16_dots()
    LONGEST_FIRST: tl.constexpr,  # grid (head groups, tiles), the last query tiles first
    SLIDING: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    if LONGEST_FIRST:  # causal: a request's last tiles see the most keys; they start first
        pid = tl.num_programs(1) - 1 - tl.program_id(1)
        first_head = tl.program_id(0) * GROUP
    else:
        pid = tl.program_id(0)
        first_head = tl.program_id(1) * GROUP
    req = _find_request(query_start_loc_ptr, num_reqs, pid, BLOCK_M)
    q_start = tl.load(query_start_loc_ptr + req).to(tl.int32)
    q_len = tl.load(query_start_loc_ptr + req + 1).to(tl.int32) - q_start
    m_tile = pid - (q_start // BLOCK_M + req)
    if m_tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + req).to(tl.int32)
    first_pos = seq_len - q_len + m_tile * BLOCK_M  # context position of the tile's first row

    # Row r is query token r // GROUP of the tile, head first_head + r % GROUP.
    rows = tl.arange(0, BLOCK_M * GROUP)
    offs_m = m_tile * BLOCK_M + rows // GROUP
    offs_d = tl.arange(0, BLOCK_D)
    qd_mask = (offs_m[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM)
    tokens = (q_start + offs_m).to(tl.int64)
    heads = first_head + rows % GROUP
    q_row = tokens * stride_qt + heads * stride_qh
    q = tl.load(q_ptr + q_row[:, None] + offs_d[None, :], mask=qd_mask, other=0.0)
    q = dot_dtype_query(q, FP16_DOTS)
    q_pos = first_pos + rows // GROUP
    kv_head = first_head // QUERIES_PER_KV

    m_i = tl.full([BLOCK_M * GROUP], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M * GROUP], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M * GROUP, BLOCK_D], dtype=tl.float32)
    block_table_row = block_tables_ptr + req.to(tl.int64) * stride_bt
    # Keys [0, full_end) are visible to every row of the tile: no mask needed.
    full_end = (first_pos + 1) // BLOCK_N * BLOCK_N
    kv_end = tl.minimum(first_pos + BLOCK_M, seq_len)
    win_lo = (q_pos - window + 1)[:, None]  # SLIDING: each row's first key
    if SLIDING:
        # Tiles before the first row's window are skipped; keys from win_full on are in
        # every row's window (the last row's starts there), those before it are masked.
        lo = tl.maximum(first_pos - window + 1, 0) // BLOCK_N * BLOCK_N
        win_full = tl.cdiv(tl.maximum(first_pos + BLOCK_M - window, 0), BLOCK_N) * BLOCK_N
        edge_end = tl.minimum(win_full, full_end)
        for n0 in range(lo, edge_end, BLOCK_N):
            acc, m_i, l_i = attend_tile(
                q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, block_table_row, n0, kv_end,
                q_pos, kv_head, qk_scale, win_lo, softcap, stride_cb, stride_cs, stride_ch,
                HEAD_DIM, BLOCK_SIZE, BLOCK_N, BLOCK_D, False, False, DOT_PRECISION, True,
                SOFTCAP,
            )  # fmt: skip
        first_full = tl.maximum(win_full, lo)
        first_diagonal = tl.maximum(full_end, lo)
    else:
        first_full = 0
        first_diagonal = full_end
    for n0 in range(first_full, full_end, BLOCK_N):
        acc, m_i, l_i = attend_tile(
            q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, block_table_row, n0, kv_end, q_pos,
            kv_head, qk_scale, win_lo, softcap, stride_cb, stride_cs, stride_ch,
            HEAD_DIM, BLOCK_SIZE, BLOCK_N, BLOCK_D, False, False, DOT_PRECISION, False, SOFTCAP,
        )  # fmt: skip
    for n0 in range(first_diagonal, kv_end, BLOCK_N):
        acc, m_i, l_i = attend_tile(
            q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, block_table_row, n0, kv_end, q_pos,
            kv_head, qk_scale, win_lo, softcap, stride_cb, stride_cs, stride_ch,
            HEAD_DIM, BLOCK_SIZE, BLOCK_N, BLOCK_D, True, True, DOT_PRECISION, SLIDING, SOFTCAP,
        )  # fmt: skip

    out = acc / l_i[:, None]
    o_row = tokens * stride_ot + heads * stride_oh
    tl.store(out_ptr + o_row[:, None] + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=qd_mask)  # fmt: skip


def _default_group(queries_per_kv: int, dtype: torch.dtype) -> int:
    """Query heads per program: all of a kv head's when they are 2, 4, 8 or 16 (16-bit)."""
    g = queries_per_kv
    return 1 if dtype == torch.float32 or g > 16 or g & (g - 1) else g


def _default_config(head_dim: int, dtype: torch.dtype, group: int) -> tuple[int, int, int, int]:
    """(BLOCK_M tokens, BLOCK_N, num_warps, num_stages) for ``group`` heads per program on a
    tensor-core GPU."""
    if dtype == torch.float32 and head_dim > 128:  # (sm_90: 149 registers, no spills)
        return max(32 // group, 1), 16, 8, 2
    if dtype == torch.float32:  # no tensor cores ("ieee" dot); keep shared memory < 100 KB
        return max(64 // group, 1), 32, 4, 2
    if head_dim > 128:
        # Gemma's 256: 64 rows and eight warps keep the fp32 accumulator in registers (sm_90,
        # untimed: 187 registers, no spills, 96 KiB of shared memory; 128 rows spill 5 KB)
        return 64 // group, 32, 8, 2
    if group == 1:
        return (128, 64, 4, 3) if head_dim <= 64 else (64, 64, 4, 3)
    # 128 rows (tokens x heads) sharing each K/V tile. NOTE: H200, Llama-3 heads (4 per kv
    # head), a 16384-token step of 30 whole prompts of 64-1024 tokens
    # (benchmarks/prefill_probe.py): head_dim 128 421.7 us vs 515.4 for the one-head default
    # (64 tokens); head_dim 64 231.7 us vs 285.6 for one head x 64 tokens. Groups of 2, 8 and
    # 16 take the same 128 rows untimed (compiled for sm_90 in the tests).
    return (128 // group, 64, 8, 2) if head_dim <= 64 else (128 // group, 32, 4, 4)


def prefill_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_reqs, max_blocks] int32
    seq_lens: torch.Tensor,  # [num_reqs] int32: context length incl. this step's tokens
    query_start_loc: torch.Tensor,  # [num_reqs + 1] int32: cumulative query lengths
    scale: float,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    group: int | None = None,
    longest_first: bool = True,
    out: torch.Tensor | None = None,
    sliding_window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Causal attention of each request's new queries over its whole cached context.

    Drop-in for ``kernels.reference.paged_attention`` (any mix of prefill, chunked prefill,
    prefix-cache hits and decode); needs no host sync. ``query_start_loc[-1]`` must equal
    ``num_tokens``; tokens past it are left unwritten. ``out`` (optional) receives the
    result instead of a new tensor. ``group``: query heads per program (they share each
    K/V tile; a power of 2 dividing the heads per kv head); ``block_m`` counts tokens.
    ``longest_first``: launch every head group's last query tiles first (they see the most
    keys, so the short ones fill the tail; same result bit for bit). NOTE: H200
    (``benchmarks/prefill_probe.py``, Llama-3 heads, default tiles): one 2048-token prompt
    116.6 vs 167.2 us (head_dim 128) and 64.3 vs 89.9 (64), one of 4096 406.7 vs 500.5
    (128), W1's 16384-token step 404.0 vs 422.1 (128) and 219.7 vs 229.6 (64).

    ``sliding_window`` (0: full attention): a query at position p sees keys (p -
    sliding_window, p] only, the tiles before a query tile's windows skipped. ``softcap``
    (0: none): scores x become ``softcap * tanh(x / softcap)`` (Gemma 2).
    """
    check_paged_inputs(query, k_cache, v_cache, block_tables, seq_lens)
    check_score_options(sliding_window, softcap)
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_reqs = seq_lens.shape[0]
    assert query_start_loc.shape == (num_reqs + 1,) and query_start_loc.is_contiguous(), (
        f"query_start_loc {tuple(query_start_loc.shape)} must be [num_reqs + 1 = {num_reqs + 1}]"
    )
    assert query_start_loc.dtype in (torch.int32, torch.int64), f"{query_start_loc.dtype}"
    queries_per_kv = num_heads // num_kv_heads
    if group is None:  # a given block_m without a group counts the tokens of one head
        group = _default_group(queries_per_kv, query.dtype) if block_m is None else 1
    assert group >= 1 and queries_per_kv % group == 0 and group & (group - 1) == 0, (
        f"group {group} must be a power of 2 dividing {queries_per_kv} query heads per kv head"
    )
    out = output_buffer(query, out)
    if num_tokens == 0 or num_reqs == 0:
        return out
    cfg_m, cfg_n, cfg_warps, cfg_stages = _default_config(head_dim, query.dtype, group)
    block_m, block_n = block_m or cfg_m, block_n or cfg_n
    # Upper bound on query tiles: each request adds at most one partial tile.
    grid = (num_tokens // block_m + num_reqs, num_heads // group)
    longest_first = longest_first and grid[0] <= _MAX_GRID_Y
    if longest_first:
        grid = grid[::-1]
    qk_scale, softcap_arg = score_args(scale, softcap)
    _prefill_kernel[grid](
        query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out,
        qk_scale, sliding_window, softcap_arg, num_reqs,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        QUERIES_PER_KV=queries_per_kv, GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=next_power_of_2(head_dim),
        DOT_PRECISION=dot_precision(query.dtype), FP16_DOTS=fp16_dots(query, k_cache),
        LONGEST_FIRST=longest_first, SLIDING=sliding_window > 0, SOFTCAP=softcap > 0,
        num_warps=num_warps or cfg_warps,
        num_stages=num_stages or cfg_stages,
    )  # fmt: skip
    return out
