"""KV-cache scatter kernel vs the torch reference."""

import pytest
import torch
from kernel_testing import DTYPE_IDS, DTYPES

from kernels import reference
from kernels.kv_cache import write_kv_cache

FP8 = torch.float8_e4m3fn


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Exact comparisons of any dtype (torch.equal has no fp8 kernels)."""
    return t.view(torch.uint8) if t.element_size() == 1 else t


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


def _cos_sin_cache(max_pos: int, rotary_dim: int, device: torch.device) -> torch.Tensor:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, device=device) / rotary_dim))
    freqs = torch.arange(max_pos, device=device)[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)  # [max_pos, rotary_dim]


def _rotary_write_case(
    num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, rotary_dim: int,
    block_size: int, num_blocks: int, dtype: torch.dtype, device: torch.device,
    kv_dtype: torch.dtype | None = None,
) -> None:  # fmt: skip
    """The fused kernel on strided q/k/v views of one qkv output vs rotary then write
    (``kv_dtype``: the caches', default ``dtype``)."""
    from kernel_testing import ROUNDING_ULPS, ULP

    from kernels.kv_cache import rotary_and_write_kv_cache

    q_w, kv_w = num_heads * head_dim, num_kv_heads * head_dim
    qkv = torch.randn(num_tokens, q_w + 2 * kv_w, device=device).to(dtype)
    query = qkv[:, :q_w].view(num_tokens, num_heads, head_dim)
    key = qkv[:, q_w : q_w + kv_w].view(num_tokens, num_kv_heads, head_dim)
    value = qkv[:, q_w + kv_w :].view(num_tokens, num_kv_heads, head_dim)
    positions = torch.randint(0, 2000, (num_tokens,), device=device)
    slots = torch.randperm(num_blocks * block_size, device=device)[:num_tokens]
    slots[[1, num_tokens // 2]] = -1  # padding: nothing cached
    cos_sin = _cos_sin_cache(2048, rotary_dim, device)
    k_cache, v_cache = _caches(num_blocks, block_size, num_kv_heads, head_dim,
                               kv_dtype or dtype, device)  # fmt: skip
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    qkv_before = qkv.clone()

    q_rot_ref, k_rot_ref = reference.rotary_embedding(positions, query, key, cos_sin)
    reference.write_kv_cache(k_rot_ref, value, k_ref, v_ref, slots)
    q_rot = rotary_and_write_kv_cache(
        positions, query, key, value, cos_sin, k_cache, v_cache, slots
    )
    tol = {"atol": 1e-5, "rtol": ROUNDING_ULPS * ULP[dtype]}
    torch.testing.assert_close(q_rot, q_rot_ref, **tol)
    # rotated keys land in their slots (an fp8 cache: rounded from the same dtype value, so
    # within the dtype's rounding before it); values: an exact copy; others unchanged
    if kv_dtype == FP8:
        tol = {"atol": 2**-9, "rtol": 2**-3}
    torch.testing.assert_close(k_cache.float(), k_ref.float(), **tol)
    assert torch.equal(_bits(v_cache), _bits(v_ref))
    assert torch.equal(qkv, qkv_before)  # the inputs are read only


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (80, 32)])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (6, 2)])
def test_rotary_and_write_kv_cache_matches_reference(
    device: torch.device,
    dtype: torch.dtype,
    head_dim: int,
    rotary_dim: int,
    num_heads: int,
    num_kv_heads: int,
) -> None:
    _rotary_write_case(13, num_heads, num_kv_heads, head_dim, rotary_dim, 16, 5, dtype, device)


@pytest.mark.gpu
def test_rotary_and_write_kv_cache_real_sizes(device: torch.device) -> None:
    _rotary_write_case(8192, 32, 8, 128, 128, 16, 4096, torch.bfloat16, device)


# NOTE: GPU only: Triton's interpreter rounds to e4m3 wrongly (1.938 -> 1.0: the carry into
# the exponent is lost), so fp8 stores are checked on the card; reads widen exactly there.
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_write_kv_cache_fp8(device: torch.device, dtype: torch.dtype) -> None:
    """An fp8 (e4m3) cache stores each key / value rounded to nearest, as torch casts it;
    slots not written keep their bytes."""
    num_blocks, block_size, num_kv_heads, head_dim, num_tokens = 6, 16, 2, 64, 23
    k_cache, v_cache = _caches(num_blocks, block_size, num_kv_heads, head_dim, FP8, device)
    slots = torch.randperm(num_blocks * block_size, device=device)[:num_tokens]
    slots[[3, 11]] = -1
    key = (4 * torch.randn(num_tokens, num_kv_heads, head_dim, device=device)).to(dtype)
    key[0, 0, :6] = torch.tensor([500.0, -1e4, float("inf"), float("-inf"), 447.0, -460.0])
    value = torch.randn_like(key)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    reference.write_kv_cache(key, value, k_ref, v_ref, slots)
    write_kv_cache(key, value, k_cache, v_cache, slots)
    assert torch.equal(_bits(k_cache), _bits(k_ref)) and torch.equal(_bits(v_cache), _bits(v_ref))
    assert k_cache.view(-1, num_kv_heads, head_dim)[int(slots[0])][0, :6].float().tolist() == [
        448.0,
        -448.0,
        448.0,
        -448.0,
        448.0,
        -448.0,
    ]  # saturated, as the reference (and torch from 2.12) does
    written = slots[slots >= 0]
    widened = k_cache.view(-1, num_kv_heads, head_dim)[written.cpu()].float()
    assert (widened - key[slots >= 0].float()).abs().max() > 0  # it did round (3 bits)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_rotary_and_write_kv_cache_fp8(device: torch.device, dtype: torch.dtype) -> None:
    _rotary_write_case(13, 6, 2, 80, 32, 16, 5, dtype, device, kv_dtype=FP8)


def test_reference_fp8_write_saturates() -> None:
    """Past e4m3's largest finite value (448) the reference stores +-448, as the kernels'
    conversions do (torch's own cast gave NaN before 2.12); NaN stays NaN."""
    cache = torch.zeros(1, 1, 1, 8, dtype=FP8)
    x = torch.tensor([500.0, -1e4, float("inf"), float("-inf"), 447.0, 1.1, float("nan"), 0.0])
    reference.write_kv_cache(x.view(1, 1, 8), x.view(1, 1, 8), cache, cache.clone(),
                             torch.tensor([0]))  # fmt: skip
    got = cache.flatten().float()
    assert got[:6].tolist() == [448.0, -448.0, 448.0, -448.0, 448.0, 1.125]
    assert got[6].isnan() and got[7] == 0.0


def test_key_and_value_of_different_layouts(device: torch.device) -> None:
    """key dense, value a strided view (its own token and head strides), query dense but
    permuted: each read at its own strides; the rotated query comes back contiguous."""
    from kernels.kv_cache import rotary_and_write_kv_cache

    key = torch.randn(6, 2, 32, device=device)
    value = torch.randn(6, 3, 48, device=device)[:, 1:, 8:40]  # strides (144, 48, 1)
    query = torch.randn(4, 6, 32, device=device).transpose(0, 1)  # strides (32, 192, 1)
    slots = torch.tensor([3, 17, -1, 30, 0, 9], device=device)
    k_cache, v_cache = _caches(3, 16, 2, 32, torch.float32, device)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    reference.write_kv_cache(key, value, k_ref, v_ref, slots)
    write_kv_cache(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)

    positions = torch.tensor([5, 0, 7, 2, 9, 1], device=device)
    cos_sin = _cos_sin_cache(16, 32, device)
    q_ref, k_rot = reference.rotary_embedding(positions, query, key, cos_sin)
    reference.write_kv_cache(k_rot, value, k_ref, v_ref, slots)
    q_rot = rotary_and_write_kv_cache(positions, query, key, value, cos_sin, k_cache, v_cache,
                                      slots)  # fmt: skip
    assert q_rot.is_contiguous()
    torch.testing.assert_close(q_rot, q_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_cache, k_ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(v_cache, v_ref)


def test_rotary_and_write_kv_cache_odd_sizes_and_layouts(device: torch.device) -> None:
    """3 kv heads (a tile of 4), rotary_dim 48 (halves of 24 in tiles of 32), a rotary table
    that is the first 48 columns of a wider one, caches after a spare block of one buffer,
    padding tokens (slot -1): the reference's query and cache rows, and nothing written
    anywhere else (not the slot before the cache)."""
    from kernels.kv_cache import rotary_and_write_kv_cache

    buf = torch.randn(2, 4, 16, 3, 64, device=device)  # [k | v, spare + 3 blocks, 16, 3, 64]
    k_cache, v_cache = buf[0, 1:], buf[1, 1:]
    query = torch.randn(7, 6, 64, device=device)
    key = torch.randn(7, 3, 64, device=device)
    value = torch.randn(8, 3, 64, device=device)[:7]  # a spare row: reads stay in bounds
    positions = torch.tensor([3, 0, 31, 9, 12, 5, 20], device=device)
    slots = torch.tensor([-1, 17, 0, 46, -1, 30, 8], device=device)  # not 47: writes in bounds
    table = torch.cat([_cos_sin_cache(32, 48, device), torch.randn(32, 16, device=device)], 1)
    want = buf.clone()
    q_ref, k_rot = reference.rotary_embedding(positions, query, key, table[:, :48])
    reference.write_kv_cache(k_rot, value, want[0, 1:], want[1, 1:], slots)
    q_rot = rotary_and_write_kv_cache(positions, query, key, value, table[:, :48], k_cache,
                                      v_cache, slots)  # fmt: skip
    torch.testing.assert_close(q_rot, q_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(buf, want, atol=1e-5, rtol=1e-5)
