"""Scatter this step's keys/values into the paged KV cache (Triton).

Same contract as ``kernels.reference.write_kv_cache``; one program per token writes every
kv head of that token, so each program moves one contiguous ``num_kv_heads * head_dim`` row.
"""

import torch
import triton
import triton.language as tl


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
):
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
    assert slot_mapping.shape == (num_tokens,), f"slot_mapping {tuple(slot_mapping.shape)}"
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
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
    )
