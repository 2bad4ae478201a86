"""Decode attention cases the main file leaves open: inputs the launchers accept but the
engine's own tensors rarely are (heads at padded strides, caches inside a larger buffer, a
value laid out unlike the key, a row-strided rotary table), extreme split maxima, an
out-of-fp16-range query, and the roundings fp16 dots and the fused rotary promise."""

import pytest
import torch
from kernel_testing import assert_close, int32, make_paged_kv, query_start_loc, ref_attention

from kernels import reference
from kernels.decode_splits import combine_splits
from kernels.paged_attention import NewTokens, paged_attention_decode

FP8 = torch.float8_e4m3fn


def test_combine_splits_at_extreme_maxima(device: torch.device) -> None:
    """The reduce rescales every split to the largest max: split maxima of +-300 (log2
    domain, past fp32's exp2 range either way) give what maxima near 0 give."""
    g = torch.Generator().manual_seed(0)
    m = torch.randn(1, 2, 4, generator=g) * 4  # [reqs, heads, splits]
    l = torch.rand(1, 2, 4, generator=g) + 0.5  # noqa: E741
    acc = torch.randn(1, 2, 4, 32, generator=g)
    w = torch.exp2(m - m.amax(-1, keepdim=True))
    want = (acc * w[..., None]).sum(2) / (l * w).sum(-1, keepdim=True)
    for shift in (0.0, 300.0, -300.0):  # 64 keys in tiles of 16: one tile a split
        out = torch.empty(1, 2, 32, device=device)
        combine_splits((m + shift).to(device), l.to(device), acc.to(device), out,
                       int32([64], device), 16)  # fmt: skip
        torch.testing.assert_close(out.cpu(), want, msg=f"split maxima shifted by {shift}")


@pytest.mark.parametrize("num_splits", [1, 2])
def test_decode_query_and_out_at_padded_head_strides(device: torch.device, num_splits: int) -> None:
    """query and out as the first 80 features of rows of 96 (head stride 96, not head_dim):
    each read / written at its own strides; the 16 padding features of ``out`` and a spare
    row after it keep their values (nothing is written past head_dim), whole or split."""
    seq_lens, head_dim = [5, 40], 80
    k_cache, v_cache, block_tables = make_paged_kv(seq_lens, 2, head_dim, 16, torch.float32,
                                                   device)  # fmt: skip
    query = torch.randn(2, 4, 96, device=device)[..., :head_dim]
    out_buf = torch.randn(3, 4, 96, device=device)
    out_rows, before = out_buf[:2], out_buf.clone()
    lens = int32(seq_lens, device)
    paged_attention_decode(query, k_cache, v_cache, block_tables, lens, 0.1, block_n=16,
                           num_splits=num_splits, out=out_rows[..., :head_dim])  # fmt: skip
    expected = ref_attention(query.contiguous(), k_cache, v_cache, block_tables, lens,
                             query_start_loc([1, 1], device), 0.1)  # fmt: skip
    assert_close(out_rows[..., :head_dim], expected, torch.float32)
    assert torch.equal(out_rows[..., head_dim:], before[:2, ..., head_dim:])
    assert torch.equal(out_buf[2], before[2])


def _caches_in_one_buffer(
    seq_lens: list[int], head_dim: int, pad: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """k / v caches as the first head_dim features of ``buf[1:, 0]`` / ``buf[1:, 1]``, one
    [1 + blocks, 2, 16, 2 kv heads, head_dim + pad] buffer (block stride two blocks' worth,
    head stride head_dim + pad, a spare block before the caches), NaN outside the caches:
    a read or write past them shows."""
    k, v, block_tables = make_paged_kv(seq_lens, 2, head_dim, 16, dtype, device)
    shape = (1 + k.shape[0], 2, 16, 2, head_dim + pad)
    buf = torch.full(shape, float("nan"), device=device).to(dtype)
    k_cache, v_cache = buf[1:, 0, ..., :head_dim], buf[1:, 1, ..., :head_dim]
    for src, dst in ((k, k_cache), (v, v_cache)):  # fp8 as bytes (no CPU fp8 copy)
        dst.view(torch.uint8).copy_(src.view(torch.uint8))
    return k_cache, v_cache, block_tables, buf


@pytest.mark.parametrize("q_dtype,kv_dtype,head_dim,pad",
                         [(torch.float32, torch.float32, 64, 16), (torch.bfloat16, FP8, 96, 32)],
                         ids=["fp32", "fp8-pairs"])  # fmt: skip
def test_decode_caches_inside_one_buffer(
    device: torch.device, q_dtype: torch.dtype, kv_dtype: torch.dtype, head_dim: int, pad: int
) -> None:
    """Blocks and heads read at the caches' own strides, no feature past head_dim read (an
    fp8 cache of 96 features: as word pairs in a tile of 128; a pair past head_dim would read
    NaN bytes, which show on the GPU only: Triton's interpreter widens e4m3 NaN to 480)."""
    seq_lens = [5, 40, 33]
    k_cache, v_cache, block_tables, _ = _caches_in_one_buffer(seq_lens, head_dim, pad,
                                                              kv_dtype, device)  # fmt: skip
    query = torch.randn(3, 4, head_dim, device=device).to(q_dtype)
    lens = int32(seq_lens, device)
    out = paged_attention_decode(query, k_cache, v_cache, block_tables, lens, 0.125, block_n=16,
                                 num_splits=2)  # fmt: skip
    dense = (c.view(torch.uint8).contiguous().view(c.dtype) for c in (k_cache, v_cache))
    expected = ref_attention(query, *dense, block_tables, lens, query_start_loc([1] * 3, device),
                             0.125)  # fmt: skip
    assert_close(out, expected, q_dtype)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("preload", [False, True])
def test_decode_new_tokens_in_their_own_layouts(
    device: torch.device, preload: bool, num_splits: int
) -> None:
    """``new_tokens`` with a value of its own strides (not the key's), a rotary table that is
    the first 32 columns of a wider one (row stride 40), caches inside one buffer, a padding
    row (seq_len 0, slot -1): the buffer and output of the reference rotary, write and
    attention; the padding row writes nothing (not the slot before the cache) and gets 0."""
    seq_lens, n = [1, 37, 0, 20], 4
    k_cache, v_cache, block_tables, buf = _caches_in_one_buffer(
        [max(s, 1) for s in seq_lens], 64, 16, torch.float32, device
    )
    query = torch.randn(n, 4, 64, device=device)
    key = torch.randn(n, 2, 64, device=device)
    key[:, :, 40] = -0.0  # past rotary_dim: cached as is, sign included
    value = torch.randn(n, 3, 96, device=device)[:, 1:, 8:72]  # strides (288, 96, 1)
    angles = torch.rand(40, 16, device=device) * 6.0
    table = torch.cat([angles.cos(), angles.sin(), torch.randn(40, 8, device=device)], dim=1)
    cos_sin = table[:, :32]
    positions = torch.tensor([max(s - 1, 0) for s in seq_lens], device=device)
    slots = torch.tensor([int(block_tables[r, (s - 1) // 16]) * 16 + (s - 1) % 16 if s else -1
                          for r, s in enumerate(seq_lens)], device=device)  # fmt: skip
    k_ref, v_ref = k_cache.contiguous(), v_cache.contiguous()
    q_rot, k_rot = reference.rotary_embedding(positions, query, key, cos_sin)
    reference.write_kv_cache(k_rot, value, k_ref, v_ref, slots)
    want_buf = buf.clone()
    want_buf[1:, 0, ..., :64], want_buf[1:, 1, ..., :64] = k_ref, v_ref
    live = [0, 1, 3]
    lens = int32(seq_lens, device)
    expected = ref_attention(q_rot[live], k_ref, v_ref, block_tables[live], lens[live],
                             query_start_loc([1] * 3, device), 0.125)  # fmt: skip
    out = paged_attention_decode(
        query, k_cache, v_cache, block_tables, lens, 0.125, block_n=16, num_splits=num_splits,
        new_tokens=NewTokens(positions, key, value, cos_sin, slots), preload=preload,
    )  # fmt: skip
    torch.testing.assert_close(buf, want_buf, atol=1e-5, rtol=1e-5, equal_nan=True)
    assert torch.equal(k_cache[..., 32:].signbit(), k_ref[..., 32:].signbit())
    assert_close(out[live], expected, torch.float32)
    assert torch.equal(out[2], torch.zeros_like(out[2]))


def test_decode_fp8_cache_query_past_fp16_range(device: torch.device) -> None:
    """fp16 dots over an fp8 cache: a bf16 query feature past fp16's range (1e5) is clamped
    to 65504, not turned into inf (which made the output NaN)."""
    seq_lens = [9, 30]
    k_cache, v_cache, block_tables = make_paged_kv(seq_lens, 2, 64, 16, FP8, device)
    query = torch.randn(2, 4, 64, device=device).bfloat16()
    query[1, 2, 5] = -1.0e5
    lens = int32(seq_lens, device)
    out = paged_attention_decode(query, k_cache, v_cache, block_tables, lens, 0.125,
                                 block_n=16, num_splits=1)  # fmt: skip
    clamped = query.float().clamp(-65504.0, 65504.0)
    expected = ref_attention(clamped, k_cache, v_cache, block_tables, lens,
                             query_start_loc([1, 1], device), 0.125)  # fmt: skip
    assert_close(out, expected, torch.bfloat16)


def test_decode_fp8_pairs_round_p_to_fp16(device: torch.device) -> None:
    """fp16 queries over an fp8 cache read as word pairs: the probabilities enter the value
    dot in fp16 (bf16 would be off by ~7e-3 at these 2-9 key contexts, where each p is large);
    within 2e-3 of the fp32 reference (measured: 7e-4)."""
    seq_lens = [2, 3, 5, 9]
    k_cache, v_cache, block_tables = make_paged_kv(seq_lens, 2, 64, 16, FP8, device)
    query = (torch.randn(4, 8, 64, device=device) * 0.5).half()
    lens = int32(seq_lens, device)
    out = paged_attention_decode(query, k_cache, v_cache, block_tables, lens, 0.125,
                                 block_n=16, num_splits=1)  # fmt: skip
    expected = ref_attention(query, k_cache, v_cache, block_tables, lens,
                             query_start_loc([1] * 4, device), 0.125)  # fmt: skip
    torch.testing.assert_close(out.float(), expected, atol=2e-3, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_decode_new_tokens_round_q_as_the_rotary_kernel(
    device: torch.device, dtype: torch.dtype
) -> None:
    """The fused rotary rounds q to its dtype before the dots, as the rotary kernel writes
    it: the same bits as ``rotary_and_write_kv_cache`` then the plain decode."""
    from kernels.kv_cache import rotary_and_write_kv_cache

    seq_lens = [1, 37, 20]
    k_cache, v_cache, block_tables = make_paged_kv(seq_lens, 2, 64, 16, dtype, device)
    query = torch.randn(3, 8, 64, device=device).to(dtype)
    key, value = (torch.randn(3, 2, 64, device=device).to(dtype) for _ in range(2))
    angles = torch.rand(40, 32, device=device) * 6.0
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=1)
    positions = torch.tensor([s - 1 for s in seq_lens], device=device)
    slots = torch.tensor([int(block_tables[r, (s - 1) // 16]) * 16 + (s - 1) % 16
                          for r, s in enumerate(seq_lens)], device=device)  # fmt: skip
    lens, kw = int32(seq_lens, device), dict(block_n=16, num_splits=3)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    q_rot = rotary_and_write_kv_cache(positions, query, key, value, cos_sin, k_ref, v_ref, slots)
    expected = paged_attention_decode(q_rot, k_ref, v_ref, block_tables, lens, 0.125, **kw)
    out = paged_attention_decode(query, k_cache, v_cache, block_tables, lens, 0.125,
                                 new_tokens=NewTokens(positions, key, value, cos_sin, slots),
                                 **kw)  # fmt: skip
    assert torch.equal(out, expected)
