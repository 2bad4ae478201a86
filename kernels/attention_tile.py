"""The step both paged attention kernels (decode, prefill) take over a tile of cached keys,
and the checks their launchers share.

KV cache layout: ``[num_blocks, block_size, num_kv_heads, head_dim]`` per layer, as in
``kernels.reference``; the cache is the query's dtype or fp8 (e4m3), widened per tile.

Two compile-time options change the scores (off, they leave the generated code as it was):
SLIDING masks the keys before each query's window (a query at position p sees keys in
(p - window, p], as transformers' sliding-window mask), SOFTCAP caps the raw scores x at
``cap * tanh(x / cap)`` (Gemma 2's attention soft-capping); ``score_args`` gives the
launchers' scale and cap arguments for it.
"""

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def attend_tile(
    q,  # [ROWS, BLOCK_D] in the dots' dtype (dot_dtype_query)
    acc,  # [ROWS, BLOCK_D] fp32, unnormalized
    m_i,  # [ROWS] fp32 running max (log2 domain)
    l_i,  # [ROWS] fp32 running sum
    k_cache_ptr,
    v_cache_ptr,
    block_table_row,  # pointer to this request's block table row
    n0,  # first key position of the tile
    kv_end,  # keys at or past this position are masked (only if MASK_KV)
    q_pos,  # [ROWS] context positions of the queries (only if CAUSAL)
    kv_head,
    qk_scale,  # softmax scale * log2(e) (SOFTCAP: score_args')
    win_lo,  # SLIDING: the first key each query sees, a scalar or [ROWS, 1]
    softcap,  # SOFTCAP: score_args' cap * log2(e)
    stride_cb,
    stride_cs,
    stride_ch,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASK_KV: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SLIDING: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """One online-softmax step of ``q`` against keys ``n0 : n0 + BLOCK_N`` of the paged cache."""
    offs_n, n_mask, kv_off = tile_rows(
        block_table_row, n0, kv_end, kv_head, stride_cb, stride_cs, stride_ch,
        BLOCK_SIZE, BLOCK_N, MASK_KV,
    )  # fmt: skip
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    k_mask = n_mask[None, :] & d_mask[:, None]
    k = tl.load(k_cache_ptr + kv_off[None, :] + offs_d[:, None], mask=k_mask, other=0.0)
    k = k.to(q.dtype)  # an fp8 cache widens exactly (dot_dtype_query)

    s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # [ROWS, BLOCK_N]
    s = modify_scores(s, offs_n, win_lo, softcap, SLIDING, SOFTCAP)
    if MASK_KV:
        s = tl.where(n_mask[None, :], s, float("-inf"))
    if CAUSAL:
        s = tl.where(offs_n[None, :] <= q_pos[:, None], s, float("-inf"))
    p, alpha, m_new, l_i = online_softmax(s, m_i, l_i)

    v_mask = n_mask[:, None] & d_mask[None, :]
    v = tl.load(v_cache_ptr + kv_off[:, None] + offs_d[None, :], mask=v_mask, other=0.0)
    pv = tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i


@triton.jit
def attend_loaded(q, acc, m_i, l_i, k, v, offs_n, n_mask, qk_scale, win_lo, softcap,
                  DOT_PRECISION: tl.constexpr, SLIDING: tl.constexpr,
                  SOFTCAP: tl.constexpr):  # fmt: skip
    """``attend_tile``'s step for a tile already in registers: keys ``k`` [BLOCK_D, BLOCK_N]
    at positions ``offs_n``, values ``v`` [BLOCK_N, BLOCK_D], the keys past ``n_mask``
    masked."""
    s = tl.dot(q, k.to(q.dtype), input_precision=DOT_PRECISION) * qk_scale
    s = modify_scores(s, offs_n, win_lo, softcap, SLIDING, SOFTCAP)
    s = tl.where(n_mask[None, :], s, float("-inf"))
    p, alpha, m_new, l_i = online_softmax(s, m_i, l_i)
    pv = tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
    return acc * alpha[:, None] + pv, m_new, l_i


@triton.jit
def modify_scores(s, offs_n, win_lo, softcap, SLIDING: tl.constexpr, SOFTCAP: tl.constexpr):
    """Scores ``s`` [ROWS, BLOCK_N] of keys ``offs_n`` soft-capped (SOFTCAP: ``s`` holds
    2 x / cap * log2(e) for the raw score x, ``softcap`` is cap * log2(e); the result is
    cap * tanh(x / cap) * log2(e), tanh through one exp2) and the keys before ``win_lo``
    masked (SLIDING). Before any other mask: a masked -inf would cap to -cap."""
    if SOFTCAP:
        s = (1.0 - 2.0 / (tl.exp2(s) + 1.0)) * softcap
    if SLIDING:
        s = tl.where(offs_n[None, :] >= win_lo, s, float("-inf"))
    return s


@triton.jit
def tile_rows(
    block_table_row,
    n0,  # a multiple of BLOCK_N
    kv_end,
    kv_head,
    stride_cb,
    stride_cs,
    stride_ch,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_KV: tl.constexpr,
):
    """Key positions ``n0 : n0 + BLOCK_N``, their mask (``< kv_end`` if MASK_KV) and where
    each key's row for ``kv_head`` starts in the cache (in elements of the given strides)."""
    local = tl.arange(0, BLOCK_N)
    offs_n = n0 + local
    n_mask = offs_n < kv_end if MASK_KV else offs_n >= 0
    # NOTE: tokens are gathered one by one, so a tile may span several (shuffled) cache blocks.
    if BLOCK_N % BLOCK_SIZE == 0:  # slots within a block do not change from tile to tile:
        table = n0 // BLOCK_SIZE + local // BLOCK_SIZE  # their offsets leave the loop (H200,
        slot = local % BLOCK_SIZE  # W1's 256-row decode: 169 vs 171 us; fp8: 157 vs 179)
    else:
        table = offs_n // BLOCK_SIZE
        slot = offs_n % BLOCK_SIZE
    blocks = tl.load(block_table_row + table, mask=n_mask, other=0).to(tl.int64)
    return offs_n, n_mask, blocks * stride_cb + (slot * stride_cs + kv_head * stride_ch)


@triton.jit
def online_softmax(s, m_i, l_i):
    """Scores ``s`` ([ROWS, N], log2 domain) into the running max ``m_i`` and sum ``l_i``:
    (probabilities, the factor that rescales what came before, new max, new sum)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def dot_dtype_query(q, FP16_DOTS: tl.constexpr):
    """``q`` in the dtype the attention dots run in: its own, or fp16 (FP16_DOTS,
    ``fp16_dots``), clamped to fp16's range."""
    if FP16_DOTS:
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
    return q


def fp16_dots(query: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """16-bit queries over an fp8 (e4m3) cache attend in fp16: one instruction widens two
    e4m3 to fp16 (to bf16 takes three more); fp16 holds the cached values exactly and
    rounds p finer than bf16 (H200, batch 256, Llama-3-8B heads: 179 us per layer vs 214
    with bf16 dots). The query is rounded to fp16, clamped to its range (+-65504)."""
    return k_cache.dtype == torch.float8_e4m3fn and query.dtype != torch.float32


def score_args(scale: float, softcap: float) -> tuple[float, float]:
    """(qk_scale, softcap) kernel arguments for a softmax ``scale`` and a soft-cap (0: none):
    the dots times qk_scale give the log2-domain scores, or with a cap what
    ``modify_scores`` takes."""
    if softcap:
        return 2.0 * scale / softcap * LOG2E, softcap * LOG2E
    return scale * LOG2E, 0.0


def check_score_options(sliding_window: int, softcap: float) -> None:
    assert sliding_window >= 0, f"sliding_window {sliding_window} must be >= 0 (0: full)"
    assert softcap >= 0.0, f"softcap {softcap} must be >= 0 (0: none)"


def dot_precision(dtype: torch.dtype) -> str:
    # NOTE: fp32 inputs would silently use tf32 tensor cores (~1e-3 error) without "ieee".
    return "ieee" if dtype == torch.float32 else "tf32"


def check_paged_inputs(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
) -> None:
    """Shape/dtype/stride asserts shared by the decode and prefill launchers."""
    assert query.dim() == 3 and query.stride(2) == 1, (
        f"query {tuple(query.shape)} must be [tokens, heads, head_dim] with a dense head_dim"
    )
    num_heads, head_dim = query.shape[1], query.shape[2]
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, (
        f"k_cache {tuple(k_cache.shape)} / v_cache {tuple(v_cache.shape)}"
    )
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1, (
        f"k/v caches need one layout with a dense head_dim: {k_cache.stride()} {v_cache.stride()}"
    )
    num_kv_heads = k_cache.shape[2]
    assert k_cache.shape[3] == head_dim, f"cache head_dim {k_cache.shape[3]} != {head_dim}"
    assert num_heads % num_kv_heads == 0, f"num_heads {num_heads} % num_kv_heads {num_kv_heads}"
    assert k_cache.dtype == v_cache.dtype in (query.dtype, torch.float8_e4m3fn), (
        f"k_cache {k_cache.dtype} / v_cache {v_cache.dtype} must be the query's {query.dtype} "
        "or float8_e4m3fn"
    )
    assert query.dtype in (torch.float32, torch.float16, torch.bfloat16), f"{query.dtype}"
    assert block_tables.dim() == 2 and block_tables.stride(1) == 1, (
        f"block_tables {tuple(block_tables.shape)} needs a dense last dim"
    )
    assert block_tables.dtype in (torch.int32, torch.int64), f"block_tables {block_tables.dtype}"
    assert seq_lens.dtype in (torch.int32, torch.int64), f"seq_lens {seq_lens.dtype}"
    assert seq_lens.is_contiguous() and seq_lens.shape == (block_tables.shape[0],), (
        f"seq_lens {tuple(seq_lens.shape)} vs block_tables {tuple(block_tables.shape)}"
    )


def output_buffer(query: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """A new output like ``query``, or the caller's ``out`` after checking it fits."""
    if out is None:
        return torch.empty_like(query, memory_format=torch.contiguous_format)
    assert (
        out.shape == query.shape
        and out.dtype == query.dtype
        and out.device == query.device
        and out.stride(2) == 1
    ), (
        f"out {out.dtype} {tuple(out.shape)} on {out.device} must match query {query.dtype} "
        f"{tuple(query.shape)} on {query.device}, with a dense head_dim"
    )
    return out
