"""KV-cache scatter kernel vs the torch reference."""

import pytest
import torch
from kernel_testing import DTYPE_IDS, DTYPES

from kernels import reference
from kernels.kv_cache import write_kv_cache


def _caches(
    num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return torch.randn(shape, device=device).to(dtype), torch.randn(shape, device=device).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_kv_heads,head_dim", [(2, 64), (3, 80)])
def test_write_kv_cache_matches_reference(
    device: torch.device, dtype: torch.dtype, block_size: int, num_kv_heads: int, head_dim: int
) -> None:
    num_blocks, num_tokens = 6, 23
    k_cache, v_cache = _caches(num_blocks, block_size, num_kv_heads, head_dim, dtype, device)
    slots = torch.randperm(num_blocks * block_size, device=device)[:num_tokens]
    slots[[3, 11]] = -1  # padding tokens are skipped
    key = torch.randn(num_tokens, num_kv_heads, head_dim, device=device).to(dtype)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, device=device).to(dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    reference.write_kv_cache(key, value, k_ref, v_ref, slots)
    write_kv_cache(key, value, k_cache, v_cache, slots)
    # Exact: a copy, and every slot not in slot_mapping keeps its old value.
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def test_write_kv_cache_strided_views_int32_slots_and_cast(device: torch.device) -> None:
    """key/value sliced from a fused qkv output; fp32 inputs cast into a bf16 cache."""
    num_tokens, num_heads, num_kv_heads, head_dim, block_size = 9, 4, 2, 64, 16
    k_cache, v_cache = _caches(4, block_size, num_kv_heads, head_dim, torch.bfloat16, device)
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, device=device)
    kv_width = num_kv_heads * head_dim
    q_width = num_heads * head_dim
    key = qkv[:, q_width : q_width + kv_width].view(num_tokens, num_kv_heads, head_dim)
    value = qkv[:, q_width + kv_width :].view(num_tokens, num_kv_heads, head_dim)
    slots = torch.tensor([5, 6, 7, 40, 41, -1, 63, 0, 17], dtype=torch.int32, device=device)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    reference.write_kv_cache(key, value, k_ref, v_ref, slots.long())
    write_kv_cache(key, value, k_cache, v_cache, slots)
    # The interpreter truncates fp32 -> bf16 (the GPU rounds to nearest): allow one bf16 ulp.
    torch.testing.assert_close(k_cache.float(), k_ref.float(), atol=0, rtol=2**-7)
    torch.testing.assert_close(v_cache.float(), v_ref.float(), atol=0, rtol=2**-7)


def test_write_kv_cache_empty(device: torch.device) -> None:
    k_cache, v_cache = _caches(2, 16, 2, 64, torch.float32, device)
    before = k_cache.clone()
    empty = torch.empty(0, 2, 64, device=device)
    write_kv_cache(empty, empty, k_cache, v_cache, torch.empty(0, dtype=torch.long, device=device))
    assert torch.equal(k_cache, before)


@pytest.mark.gpu
def test_write_kv_cache_real_sizes(device: torch.device) -> None:
    num_blocks, block_size, num_kv_heads, head_dim, num_tokens = 4096, 16, 8, 128, 8192
    k_cache, v_cache = _caches(num_blocks, block_size, num_kv_heads, head_dim, torch.bfloat16,
                               device)  # fmt: skip
    slots = torch.randperm(num_blocks * block_size, device=device)[:num_tokens]
    key = torch.randn(num_tokens, num_kv_heads, head_dim, device=device).bfloat16()
    value = torch.randn_like(key)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    reference.write_kv_cache(key, value, k_ref, v_ref, slots)
    write_kv_cache(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
