"""Scatter this step's keys/values into the paged KV cache (Triton).

Same contract as ``kernels.reference.write_kv_cache``; one program per token writes every
kv head of that token, so each program moves one contiguous ``num_kv_heads * head_dim`` row.
``rotary_and_write_kv_cache`` also applies the rotary embedding on the way: queries to a new
tensor, keys straight into the cache (one kernel instead of two, and no rotated-key copy).
"""

import torch
import triton
import triton.language as tl

from kernels.launch import next_power_of_2
from kernels.pdl import pdl_launch, wait_for_predecessor
from kernels.rotary import _load_cos_sin, _rotate_heads, rope_rows


@triton.jit
def _write_kv_cache_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim]
    value_ptr,
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,
    slot_mapping_ptr,  # [num_tokens]
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_cs,
    stride_ch,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_predecessor(PDL)
    token = tl.program_id(0)
    # NOTE: int64 so that slot * stride cannot overflow on large caches.
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # padding token
        return
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)

    src_k = key_ptr + token.to(tl.int64) * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :]
    src_v = value_ptr + token.to(tl.int64) * stride_vt + offs_h[:, None] * stride_vh
    src_v += offs_d[None, :]
    block = slot // BLOCK_SIZE
    dst = block * stride_cb + (slot % BLOCK_SIZE) * stride_cs
    dst += offs_h[:, None] * stride_ch + offs_d[None, :]

    k = tl.load(src_k, mask=mask)
    v = tl.load(src_v, mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int32/int64; -1 = skip (padding)
) -> None:
    """Scatter new keys/values into the paged cache at their flat slots, in place.

    ``key``/``value`` may be strided views (e.g. slices of a fused qkv output) as long as
    the head_dim axis is contiguous; the caches must share one layout with a contiguous
    head_dim axis.
    """
    assert key.dim() == 3, f"key {tuple(key.shape)} must be [tokens, kv_heads, head_dim]"
    num_tokens, num_kv_heads, head_dim = key.shape
    assert value.shape == key.shape, f"value {tuple(value.shape)} != key {tuple(key.shape)}"
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, (
        f"k_cache {tuple(k_cache.shape)} / v_cache {tuple(v_cache.shape)}"
    )
    assert k_cache.shape[2:] == (num_kv_heads, head_dim), (
        f"cache heads/dim {tuple(k_cache.shape[2:])} != key {(num_kv_heads, head_dim)}"
    )
    assert k_cache.stride() == v_cache.stride(), "k_cache and v_cache must share strides"
    assert key.stride(2) == 1 and value.stride(2) == 1, "head_dim axis of key/value must be dense"
    assert k_cache.stride(3) == 1, "head_dim axis of the cache must be dense"
    assert slot_mapping.shape == (num_tokens,) and slot_mapping.is_contiguous(), (
        f"slot_mapping {tuple(slot_mapping.shape)} {slot_mapping.stride()} must be a contiguous "
        f"[{num_tokens}]"
    )
    assert slot_mapping.dtype in (torch.int32, torch.int64), f"slot_mapping {slot_mapping.dtype}"
    if num_tokens == 0:
        return
    _write_kv_cache_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_H=next_power_of_2(num_kv_heads),
        BLOCK_D=next_power_of_2(head_dim),
        **pdl_launch(key.device),
    )


@triton.jit
def _rotary_write_kv_kernel(
    positions_ptr,  # [num_tokens]
    q_ptr,  # [num_tokens, num_heads, head_dim]
    key_ptr,  # [num_tokens, num_kv_heads, head_dim]
    value_ptr,
    q_out_ptr,  # [num_tokens, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,
    slot_mapping_ptr,  # [num_tokens]
    cos_sin_ptr,  # [max_positions, rotary_dim]: cos half | sin half
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_qot,
    stride_qoh,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_cos,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_KV_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    COPY_PASS: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_predecessor(PDL)
    token = tl.program_id(0).to(tl.int64)
    cos, sin = _load_cos_sin(cos_sin_ptr, positions_ptr, token, stride_cos, HALF, BLOCK_HALF)
    _rotate_heads(
        q_ptr + token * stride_qt, q_out_ptr + token * stride_qot, stride_qh, stride_qoh,
        cos, sin, NUM_HEADS, HEAD_DIM, HALF, BLOCK_H, BLOCK_HALF, BLOCK_PASS, COPY_PASS,
    )  # fmt: skip
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # padding token: its query is rotated (harmless), nothing is cached
        return
    dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs
    _rotate_heads(
        key_ptr + token * stride_kt, k_cache_ptr + dst, stride_kh, stride_ch,
        cos, sin, NUM_KV_HEADS, HEAD_DIM, HALF, BLOCK_KV_H, BLOCK_HALF, BLOCK_PASS, COPY_PASS,
    )  # fmt: skip
    offs_h = tl.arange(0, BLOCK_KV_H)[:, None]
    offs_d = tl.arange(0, BLOCK_D)[None, :]
    mask = (offs_h < NUM_KV_HEADS) & (offs_d < HEAD_DIM)
    v = tl.load(value_ptr + token * stride_vt + offs_h * stride_vh + offs_d, mask=mask)
    tl.store(v_cache_ptr + dst + offs_h * stride_ch + offs_d,
             v.to(v_cache_ptr.dtype.element_ty), mask=mask)  # fmt: skip


def rotary_and_write_kv_cache(
    positions: torch.Tensor,  # [num_tokens] int32/int64
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cos_sin_cache: torch.Tensor,  # [max_positions, rotary_dim] fp32: cos half | sin half
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int32/int64; -1 = skip (padding)
) -> torch.Tensor:  # rotated query, [num_tokens, num_heads, head_dim], contiguous
    """``reference.rotary_embedding`` then ``reference.write_kv_cache`` of the rotated key and
    the value, in one kernel; returns the rotated query. Inputs may be strided views (a fused
    qkv output) with a dense head_dim; the cache dtype is the query's or fp8 (e4m3), which
    takes the rotated key rounded to the query's dtype first."""
    assert query.dim() == 3, f"query {tuple(query.shape)} must be [tokens, heads, head_dim]"
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    rotary_dim = cos_sin_cache.shape[1]
    assert key.shape == value.shape == (num_tokens, num_kv_heads, head_dim), (
        f"key {tuple(key.shape)} / value {tuple(value.shape)} vs query {tuple(query.shape)}"
    )
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, (
        f"k_cache {tuple(k_cache.shape)} / v_cache {tuple(v_cache.shape)}"
    )
    assert k_cache.shape[2:] == (num_kv_heads, head_dim), (
        f"cache heads/dim {tuple(k_cache.shape[2:])} != key {(num_kv_heads, head_dim)}"
    )
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1, (
        "k_cache and v_cache must share strides with a dense head_dim"
    )
    assert query.dtype == key.dtype == value.dtype, (
        f"query {query.dtype} / key {key.dtype} / value {value.dtype} must match"
    )
    assert k_cache.dtype == v_cache.dtype in (query.dtype, torch.float8_e4m3fn), (
        f"cache {k_cache.dtype} / {v_cache.dtype} must be the query's {query.dtype} or fp8"
    )
    assert query.stride(2) == key.stride(2) == value.stride(2) == 1, "head_dim must be dense"
    assert positions.shape == slot_mapping.shape == (num_tokens,), (
        f"positions {tuple(positions.shape)} / slot_mapping {tuple(slot_mapping.shape)}"
    )
    assert positions.is_contiguous() and slot_mapping.is_contiguous(), (
        f"positions {positions.stride()} / slot_mapping {slot_mapping.stride()} must be contiguous"
    )
    assert positions.dtype in (torch.int32, torch.int64), f"positions {positions.dtype}"
    assert slot_mapping.dtype in (torch.int32, torch.int64), f"slot_mapping {slot_mapping.dtype}"
    tensors = (positions, query, key, value, cos_sin_cache, k_cache, v_cache, slot_mapping)
    assert len({t.device for t in tensors}) == 1, "all inputs must be on one device"
    assert rotary_dim > 0 and rotary_dim % 2 == 0 and rotary_dim <= head_dim, (
        f"rotary_dim {rotary_dim} must be even and in [2, head_dim {head_dim}]"
    )
    assert cos_sin_cache.stride(1) == 1, "cos_sin_cache needs a dense last dim"
    q_out = torch.empty_like(query, memory_format=torch.contiguous_format)
    if num_tokens == 0:
        return q_out
    half = rotary_dim // 2
    pass_dim = head_dim - rotary_dim
    _rotary_write_kv_kernel[(num_tokens,)](
        positions, query, key, value, q_out, k_cache, v_cache, slot_mapping, cos_sin_cache,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1),
        value.stride(0), value.stride(1), q_out.stride(0), q_out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), cos_sin_cache.stride(0),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HALF=half,
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_H=next_power_of_2(num_heads),
        BLOCK_KV_H=next_power_of_2(num_kv_heads),
        BLOCK_HALF=next_power_of_2(half),
        BLOCK_PASS=next_power_of_2(max(pass_dim, 1)),
        BLOCK_D=next_power_of_2(head_dim),
        COPY_PASS=pass_dim > 0, **pdl_launch(query.device),
    )  # fmt: skip
    return q_out


# The fused decode kernel's (kernels.paged_attention) write of one request's new key and value.


@triton.jit
def new_key_value(k_new_ptr, v_new_ptr, k_cache_ptr, v_cache_ptr, req, kv_head, offs_d,
                  cos_sin_row, stride_kt, stride_kh, stride_vt, stride_vh, HALF: tl.constexpr,
                  HEAD_DIM: tl.constexpr):  # fmt: skip
    """This step's key of ``kv_head``, rotated, and its value, [1, BLOCK_D] in the cache's
    dtype (the key rounded as the rotary kernel writes it: to the key's dtype, then the
    cache's)."""
    d_mask = offs_d[None, :] < HEAD_DIM
    k_row = k_new_ptr + req.to(tl.int64) * stride_kt + kv_head * stride_kh
    k_new = rope_rows(k_row, offs_d[None, :], d_mask, cos_sin_row, HALF)
    k_new = k_new.to(k_new_ptr.dtype.element_ty).to(k_cache_ptr.dtype.element_ty)
    v_row = v_new_ptr + req.to(tl.int64) * stride_vt + kv_head * stride_vh
    v_new = tl.load(v_row + offs_d[None, :], mask=d_mask, other=0.0)
    return k_new, v_new.to(v_cache_ptr.dtype.element_ty)


@triton.jit
def store_new_key_value(k_cache_ptr, v_cache_ptr, k_new, v_new, slot_mapping_ptr, req,
                        kv_head, offs_d, stride_cb, stride_cs, stride_ch,
                        BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr):  # fmt: skip
    """Write the new key and value at the request's slot. No slot < 0 check: padding rows
    have seq_len 0 and own nothing."""
    slot = tl.load(slot_mapping_ptr + req).to(tl.int64)
    dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs
    dst += kv_head * stride_ch + offs_d[None, :]
    d_mask = offs_d[None, :] < HEAD_DIM
    tl.store(k_cache_ptr + dst, k_new, mask=d_mask)
    tl.store(v_cache_ptr + dst, v_new, mask=d_mask)
