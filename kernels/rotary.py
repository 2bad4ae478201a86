"""Neox-style (rotate-half) rotary embedding of queries and keys (Triton); one program per token."""

import torch
import triton
import triton.language as tl

from kernels.launch import next_power_of_2


@triton.jit
def rope_rows(rows, d, mask, cos_sin_row, HALF: tl.constexpr):
    """Neox rotary of the rows at ``rows`` ([R, 1] pointers) over features ``d`` ([1, D]), in
    fp32: the first ``2 * HALF`` features rotate in halves, the rest pass through. The same
    explicit FMAs as ``_rotate_heads``, so the same roundings."""
    first = d < HALF
    rot = d < 2 * HALF
    j = tl.where(first, d, d - HALF)  # index into the cos / sin halves
    x = tl.load(rows + d, mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(rows + tl.where(first, d + HALF, d - HALF), mask=mask & rot, other=0.0)
    xp = xp.to(tl.float32)
    cos = tl.load(cos_sin_row + j, mask=rot, other=1.0).to(tl.float32)
    sin = tl.load(cos_sin_row + HALF + j, mask=rot, other=0.0).to(tl.float32)
    out = tl.where(first, tl.fma(x, cos, -(xp * sin)), tl.fma(x, cos, xp * sin))
    return tl.where(rot, out, x)  # features past the rotary pass through unchanged (-0.0 too)


@triton.jit
def _rotate_heads(
    src_ptr,  # this token's row of [num_tokens, num_heads, head_dim]
    dst_ptr,
    stride_sh,
    stride_dh,
    cos,  # [1, BLOCK_HALF] fp32
    sin,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
    COPY_PASS: tl.constexpr,
):
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    offs_r = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (offs_h < NUM_HEADS) & (offs_r < HALF)
    src = src_ptr + offs_h * stride_sh + offs_r
    dst = dst_ptr + offs_h * stride_dh + offs_r
    x1 = tl.load(src, mask=mask, other=0.0)
    x2 = tl.load(src + HALF, mask=mask, other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    # NOTE: explicit FMAs: the decode kernel's fused rotary (rope_rows)
    # computes the same ones, so a key cached by either is bit-identical.
    # Rounded to the input's dtype, then (an fp8 KV cache) to the destination's.
    out_dt = dst_ptr.dtype.element_ty
    tl.store(dst, tl.fma(x1f, cos, -(x2f * sin)).to(x1.dtype).to(out_dt), mask=mask)
    tl.store(dst + HALF, tl.fma(x2f, cos, x1f * sin).to(x1.dtype).to(out_dt), mask=mask)
    if COPY_PASS:  # features past rotary_dim are copied unchanged
        offs_p = 2 * HALF + tl.arange(0, BLOCK_PASS)[None, :]
        p_mask = (offs_h < NUM_HEADS) & (offs_p < HEAD_DIM)
        x = tl.load(src_ptr + offs_h * stride_sh + offs_p, mask=p_mask)
        tl.store(dst_ptr + offs_h * stride_dh + offs_p, x.to(out_dt), mask=p_mask)


@triton.jit
def _load_cos_sin(cos_sin_ptr, positions_ptr, token, stride_cs, HALF: tl.constexpr,
                  BLOCK_HALF: tl.constexpr):  # fmt: skip
    """([1, BLOCK_HALF], [1, BLOCK_HALF]) fp32 cos and sin of ``token``'s position."""
    pos = tl.load(positions_ptr + token).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_HALF)[None, :]
    cs_mask = offs_r < HALF
    cos = tl.load(cos_sin_ptr + pos * stride_cs + offs_r, mask=cs_mask, other=0.0)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + offs_r, mask=cs_mask, other=0.0)
    return cos.to(tl.float32), sin.to(tl.float32)


@triton.jit
def _rotary_kernel(
    positions_ptr,  # [num_tokens]
    q_ptr,  # [num_tokens, num_heads, head_dim]
    k_ptr,  # [num_tokens, num_kv_heads, head_dim]
    q_out_ptr,
    k_out_ptr,
    cos_sin_ptr,  # [max_positions, rotary_dim]: cos half | sin half
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_qot,
    stride_qoh,
    stride_kot,
    stride_koh,
    stride_cs,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_KV_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
    COPY_PASS: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cos, sin = _load_cos_sin(cos_sin_ptr, positions_ptr, token, stride_cs, HALF, BLOCK_HALF)
    _rotate_heads(
        q_ptr + token * stride_qt, q_out_ptr + token * stride_qot, stride_qh, stride_qoh,
        cos, sin, NUM_HEADS, HEAD_DIM, HALF, BLOCK_H, BLOCK_HALF, BLOCK_PASS, COPY_PASS,
    )  # fmt: skip
    _rotate_heads(
        k_ptr + token * stride_kt, k_out_ptr + token * stride_kot, stride_kh, stride_koh,
        cos, sin, NUM_KV_HEADS, HEAD_DIM, HALF, BLOCK_KV_H, BLOCK_HALF, BLOCK_PASS, COPY_PASS,
    )  # fmt: skip


def rotary_embedding(
    positions: torch.Tensor,  # [num_tokens] int64
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cos_sin_cache: torch.Tensor,  # [max_positions, rotary_dim] fp32: cos half | sin half
    *,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style (rotate-half) rotary embedding over the first ``rotary_dim`` features.

    Returns new contiguous tensors, or with ``inplace=True`` rotates ``query``/``key`` (which may
    be strided views, e.g. of a fused qkv output) in place and returns them.
    """
    assert query.dim() == 3, f"query {tuple(query.shape)} must be [tokens, heads, head_dim]"
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    rotary_dim = cos_sin_cache.shape[1]
    assert key.shape == (num_tokens, num_kv_heads, head_dim), f"key {tuple(key.shape)}"
    assert positions.shape == (num_tokens,) and positions.is_contiguous(), (
        f"positions {tuple(positions.shape)} {positions.stride()} must be a contiguous "
        f"[{num_tokens}]"
    )
    assert positions.dtype in (torch.int32, torch.int64), f"positions {positions.dtype}"
    assert rotary_dim > 0 and rotary_dim % 2 == 0 and rotary_dim <= head_dim, (
        f"rotary_dim {rotary_dim} must be even and in [2, head_dim {head_dim}]"
    )
    assert query.stride(2) == 1 and key.stride(2) == 1, "query/key need a dense head_dim"
    assert cos_sin_cache.stride(1) == 1, "cos_sin_cache needs a dense last dim"
    assert query.dtype == key.dtype, f"query {query.dtype} != key {key.dtype}"
    q_out = query if inplace else torch.empty_like(query, memory_format=torch.contiguous_format)
    k_out = key if inplace else torch.empty_like(key, memory_format=torch.contiguous_format)
    if num_tokens == 0:
        return q_out, k_out
    half = rotary_dim // 2
    pass_dim = head_dim - rotary_dim
    _rotary_kernel[(num_tokens,)](
        positions, query, key, q_out, k_out, cos_sin_cache,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        cos_sin_cache.stride(0),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HALF=half,
        BLOCK_H=next_power_of_2(num_heads),
        BLOCK_KV_H=next_power_of_2(num_kv_heads),
        BLOCK_HALF=next_power_of_2(half),
        BLOCK_PASS=next_power_of_2(max(pass_dim, 1)),
        COPY_PASS=pass_dim > 0 and not inplace,
    )  # fmt: skip
    return q_out, k_out
