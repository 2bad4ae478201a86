"""Neox rotary-embedding kernel vs the torch reference."""

import pytest
import torch
from kernel_testing import DTYPE_IDS, DTYPES, ROUNDING_ULPS, ULP

from kernels import reference
from kernels.rotary import rotary_embedding


def _cos_sin_cache(max_pos: int, rotary_dim: int, device: torch.device) -> torch.Tensor:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, device=device) / rotary_dim))
    freqs = torch.arange(max_pos, device=device)[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)  # [max_pos, rotary_dim]


def _check(actual: torch.Tensor, expected: torch.Tensor) -> None:
    rtol = ROUNDING_ULPS * ULP[expected.dtype]
    assert actual.dtype == expected.dtype and not actual.isnan().any()
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (80, 32), (128, 128)])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (6, 2)])
def test_rotary_matches_reference(
    device: torch.device,
    dtype: torch.dtype,
    head_dim: int,
    rotary_dim: int,
    num_heads: int,
    num_kv_heads: int,
) -> None:
    num_tokens = 11
    positions = torch.randint(0, 500, (num_tokens,), device=device)
    query = torch.randn(num_tokens, num_heads, head_dim, device=device).to(dtype)
    key = torch.randn(num_tokens, num_kv_heads, head_dim, device=device).to(dtype)
    cache = _cos_sin_cache(512, rotary_dim, device)
    q_before, k_before = query.clone(), key.clone()
    q, k = rotary_embedding(positions, query, key, cache)
    q_ref, k_ref = reference.rotary_embedding(positions, query, key, cache)
    _check(q, q_ref)
    _check(k, k_ref)
    assert torch.equal(query, q_before) and torch.equal(key, k_before)


@pytest.mark.parametrize("rotary_dim", [64, 32])
def test_rotary_inplace_on_qkv_views(device: torch.device, rotary_dim: int) -> None:
    """In place on strided q/k views of a fused qkv output; v and other tokens untouched."""
    num_tokens, num_heads, num_kv_heads, head_dim = 6, 4, 2, 64
    q_w, kv_w = num_heads * head_dim, num_kv_heads * head_dim
    qkv = torch.randn(num_tokens, q_w + 2 * kv_w, device=device).bfloat16()
    query = qkv[:, :q_w].view(num_tokens, num_heads, head_dim)
    key = qkv[:, q_w : q_w + kv_w].view(num_tokens, num_kv_heads, head_dim)
    positions = torch.arange(100, 100 + num_tokens, device=device, dtype=torch.int32)
    cache = _cos_sin_cache(128, rotary_dim, device)
    q_ref, k_ref = reference.rotary_embedding(positions.long(), query, key, cache)
    v_before = qkv[:, q_w + kv_w :].clone()
    q, k = rotary_embedding(positions, query, key, cache, inplace=True)
    assert q.data_ptr() == query.data_ptr() and k.data_ptr() == key.data_ptr()
    _check(query, q_ref)
    _check(key, k_ref)
    assert torch.equal(qkv[:, q_w + kv_w :], v_before)


@pytest.mark.gpu
def test_rotary_real_sizes(device: torch.device) -> None:
    num_tokens = 4096
    positions = torch.randint(0, 8192, (num_tokens,), device=device)
    query = torch.randn(num_tokens, 32, 128, device=device).bfloat16()
    key = torch.randn(num_tokens, 8, 128, device=device).bfloat16()
    cache = _cos_sin_cache(8192, 128, device)
    q, k = rotary_embedding(positions, query, key, cache)
    q_ref, k_ref = reference.rotary_embedding(positions, query, key, cache)
    torch.testing.assert_close(q, q_ref, atol=1e-2, rtol=2**-7)
    torch.testing.assert_close(k, k_ref, atol=1e-2, rtol=2**-7)


def test_rotary_dim_zero_and_bad_query_are_named(device: torch.device) -> None:
    """A rotary_dim of 0 (a cos_sin_cache of width 0) and a 2-D query fail with the value
    named (they failed inside the kernel build / with an IndexError)."""
    from kernels.attention_tile import check_paged_inputs

    q, k = torch.randn(3, 4, 8, device=device), torch.randn(3, 2, 8, device=device)
    positions = torch.arange(3, device=device)
    with pytest.raises(AssertionError, match=r"rotary_dim 0 must be even and in \[2, head_dim 8\]"):
        rotary_embedding(positions, q, k, torch.empty(16, 0, device=device))
    cache = torch.zeros(2, 4, 2, 8, device=device)
    with pytest.raises(
        AssertionError, match=r"query \(3, 32\) must be \[tokens, heads, head_dim\]"
    ):
        check_paged_inputs(q.view(3, 32), cache, cache, torch.zeros(3, 1, dtype=torch.int32),
                           torch.ones(3, dtype=torch.int32))  # fmt: skip


def test_rotary_out_of_place_from_qkv_views(device: torch.device) -> None:
    """Strided query/key views (a fused qkv output) rotated out of place: new contiguous
    tensors, written at their own strides, and the views untouched."""
    qkv = torch.randn(5, (4 + 2 * 2) * 64, device=device)
    q = qkv[:, : 4 * 64].view(5, 4, 64)
    k = qkv[:, 4 * 64 : 6 * 64].view(5, 2, 64)
    before = qkv.clone()
    positions = torch.tensor([0, 3, 9, 1, 30], device=device)
    cos_sin = _cos_sin_cache(32, 32, device)
    q_out, k_out = rotary_embedding(positions, q, k, cos_sin)
    q_ref, k_ref = reference.rotary_embedding(positions, q, k, cos_sin)
    assert q_out.is_contiguous() and k_out.is_contiguous() and torch.equal(qkv, before)
    _check(q_out, q_ref)
    _check(k_out, k_ref)


@pytest.mark.parametrize("inplace", [False, True])
def test_rotary_odd_sizes_and_a_strided_table(device: torch.device, inplace: bool) -> None:
    """3 kv heads (a tile of 4), rotary_dim 48 of head_dim 64 (halves of 24 in tiles of 32)
    and a rotary table that is the first 48 columns of a wider one (row stride 64): the
    reference's rotation, the 16 features past rotary_dim unchanged (in place too)."""
    positions = torch.tensor([0, 7, 31, 2, 19], device=device)
    query = torch.randn(5, 6, 64, device=device)
    key = torch.randn(5, 3, 64, device=device)
    table = torch.cat([_cos_sin_cache(32, 48, device), torch.randn(32, 16, device=device)], 1)
    q_ref, k_ref = reference.rotary_embedding(positions, query, key, table[:, :48])
    q, k = rotary_embedding(positions, query.clone(), key.clone(), table[:, :48],
                            inplace=inplace)  # fmt: skip
    _check(q, q_ref)
    _check(k, k_ref)
