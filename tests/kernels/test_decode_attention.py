"""Decode attention kernel (GQA, split-K) vs the torch reference."""

import pytest
import torch
from kernel_testing import (
    DTYPE_IDS,
    DTYPES,
    assert_close,
    int32,
    make_paged_kv,
    query_start_loc,
    ref_attention,
)

from kernels.decode_splits import MAX_SPLITS, choose_num_splits, combine_splits, reduce_block
from kernels.paged_attention import paged_attention_decode

SEQ_LENS = [1, 37, 70, 16]  # none but 16 a multiple of the block size
FP8 = torch.float8_e4m3fn


def _run(
    device: torch.device,
    dtype: torch.dtype,
    seq_lens: list[int],
    num_kv_heads: int,
    group: int,
    head_dim: int,
    block_size: int,
    kv_dtype: torch.dtype | None = None,
    **kwargs: int,
) -> None:
    num_heads = num_kv_heads * group
    k_cache, v_cache, block_tables = make_paged_kv(
        seq_lens, num_kv_heads, head_dim, block_size, kv_dtype or dtype, device
    )
    query = torch.randn(len(seq_lens), num_heads, head_dim, device=device).to(dtype)
    lens = int32(seq_lens, device)
    scale = head_dim**-0.5
    out = paged_attention_decode(query, k_cache, v_cache, block_tables, lens, scale, **kwargs)
    qsl = query_start_loc([1] * len(seq_lens), device)
    expected = ref_attention(query, k_cache, v_cache, block_tables, lens, qsl, scale)
    assert out.shape == query.shape and out.dtype == dtype
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("block_size", [16, 32])
def test_decode_matches_reference(
    device: torch.device, dtype: torch.dtype, group: int, block_size: int
) -> None:
    _run(device, dtype, SEQ_LENS, 2, group, 64, block_size, block_n=16)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("num_splits", [2, 3, 8])
@pytest.mark.parametrize("block_size", [16, 32])
def test_decode_split_k(
    device: torch.device, dtype: torch.dtype, num_splits: int, block_size: int
) -> None:
    # 8 splits of 16-key tiles leave empty trailing splits for the short requests.
    _run(device, dtype, SEQ_LENS, 2, 4, 64, block_size, block_n=16, num_splits=num_splits)


def test_decode_split_k_at_most_splits(device: torch.device) -> None:
    """The largest grid: a short context leaves most splits empty, a long one (133 tiles of
    16 keys) puts two tiles in each of the first 67 splits."""
    _run(device, torch.float32, [37, 2120], 1, 4, 32, 16, block_n=16, num_splits=MAX_SPLITS)


def test_combine_reads_only_the_splits_that_hold_keys(device: torch.device) -> None:
    """Splits past a request's context are never read: NaN there changes nothing. 40 keys in
    tiles of 16 over 8 splits: 3 tiles, one a split; 100 keys: 7 tiles, 7 splits; 0 keys
    (padding): none, zeros out."""
    heads, splits, d = 2, 8, 32
    g = torch.Generator().manual_seed(0)
    m = torch.randn(3, heads, splits, generator=g) * 4
    l = torch.rand(3, heads, splits, generator=g) + 0.5  # noqa: E741
    acc = torch.randn(3, heads, splits, d, generator=g)
    for row, active in enumerate([3, 7, 0]):
        for t in (m, l, acc):
            t[row, :, active:] = float("nan")
    out = torch.empty(3, heads, d, device=device)
    combine_splits(m.to(device), l.to(device), acc.to(device), out, int32([40, 100, 0], device), 16)
    for row, active in enumerate([3, 7]):
        w = torch.exp2(m[row, :, :active] - m[row, :, :active].amax(-1, keepdim=True))
        total = (l[row, :, :active] * w).sum(-1, keepdim=True)
        want = (acc[row, :, :active] * w[..., None]).sum(1) / total
        torch.testing.assert_close(out[row].cpu(), want)
    assert out[2].eq(0).all()


@pytest.mark.parametrize("head_dim", [80, 128])
def test_decode_padded_head_dim_and_wide_tiles(device: torch.device, head_dim: int) -> None:
    # block_n=32 with block_size=16: one tile gathers two shuffled cache blocks.
    _run(device, torch.bfloat16, [5, 90], 1, 3, head_dim, 16, block_n=32, num_splits=2)


def test_decode_strided_query(device: torch.device) -> None:
    """Query as a view into a fused qkv output (row stride > num_heads * head_dim)."""
    seq_lens, num_kv_heads, head_dim = [20, 41], 2, 64
    k_cache, v_cache, block_tables = make_paged_kv(
        seq_lens, num_kv_heads, head_dim, 16, torch.float32, device
    )
    qkv = torch.randn(2, (4 + 2 * num_kv_heads) * head_dim, device=device)
    query = qkv[:, : 4 * head_dim].view(2, 4, head_dim)
    lens = int32(seq_lens, device)
    out = paged_attention_decode(query, k_cache, v_cache, block_tables, lens, 0.2, block_n=16)
    qsl = query_start_loc([1, 1], device)
    assert_close(out, ref_attention(query, k_cache, v_cache, block_tables, lens, qsl, 0.2),
                 torch.float32)  # fmt: skip


@pytest.mark.filterwarnings("error::RuntimeWarning")  # the interpreter's integer x // 0
def test_decode_zero_length_padding_rows_give_zeros(device: torch.device) -> None:
    k_cache, v_cache, block_tables = make_paged_kv([9, 1], 2, 64, 16, torch.float32, device)
    query = torch.randn(2, 4, 64, device=device)
    for splits in (1, 2):
        out = paged_attention_decode(
            query, k_cache, v_cache, block_tables, int32([9, 0], device), 0.1, num_splits=splits
        )
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert not out[0].isnan().any()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("max_seq_len,splits", [(None, 3), (64, 1), (128, 2)])
def test_decode_default_tiles_at_tile_edges(
    device: torch.device, dtype: torch.dtype, max_seq_len: int | None, splits: int
) -> None:
    """The launcher's own choices (64-key tiles; splits from ``max_seq_len``, else from the
    table's capacity of 9 blocks: 144 keys) at contexts of exactly one and two key tiles,
    one cache block, one token, and one key past a tile."""
    seq_lens = [64, 16, 1, 65, 128]
    assert choose_num_splits(len(seq_lens), 2, max_seq_len or 144, 64, 132) == splits
    _run(device, dtype, seq_lens, 2, 3, 32, 16, max_seq_len=max_seq_len)


@pytest.mark.parametrize("group", [20, 32])
def test_decode_more_than_16_heads_per_kv_head(device: torch.device, group: int) -> None:
    """Multi-query models: the query rows of a program grow past their 16-row floor to the
    next power of 2 (32 here), the rows past the group masked; whole or split contexts."""
    _run(device, torch.float16, [5, 40], 1, group, 32, 16, max_seq_len=40)
    _run(device, torch.float16, [5, 40], 1, group, 32, 16, block_n=16, num_splits=2)


def test_decode_empty_batch(device: torch.device) -> None:
    k_cache, v_cache, block_tables = make_paged_kv([3], 2, 32, 16, torch.float32, device)
    query = torch.randn(0, 4, 32, device=device)
    out = paged_attention_decode(query, k_cache, v_cache, block_tables[:0], int32([], device), 0.1)
    assert out.shape == (0, 4, 32)


def test_choose_num_splits() -> None:
    # Many programs or a single key tile: no split.
    assert choose_num_splits(64, 8, 8192, 64, 132) == 1
    assert choose_num_splits(1, 8, 64, 64, 132) == 1
    # Few programs: ~16 warps per SM (4 programs of four warps), down to one key tile per
    # split, at most MAX_SPLITS (128) splits.
    assert choose_num_splits(1, 8, 256, 64, 132) == 4
    assert choose_num_splits(1, 8, 1024, 64, 132) == 16
    assert choose_num_splits(1, 8, 8192, 64, 132) == 66
    assert choose_num_splits(4, 8, 1024, 64, 132) == 16
    assert choose_num_splits(16, 8, 1024, 64, 132) == 5
    assert choose_num_splits(1, 1, 1 << 20, 64, 132) == 128
    # One-warp programs (a lone request): 16 an SM.
    assert choose_num_splits(1, 8, 400, 32, 132, num_warps=1) == 13
    assert choose_num_splits(1, 8, 4096, 32, 132, num_warps=1) == 128
    assert choose_num_splits(4, 8, 131072, 32, 132, num_warps=1) == 66
    assert choose_num_splits(1, 8, 131072, 32, 132, num_warps=2) == 128
    # The reduce reads 64 splits in one tile, or all 128 past 64.
    assert [reduce_block(n) for n in (1, 64, 65, 128)] == [64, 64, 128, 128]
    # Exactly two programs an SM already: no split; a 32-warp program: one per SM.
    assert choose_num_splits(33, 8, 8192, 64, 132) == 1
    assert choose_num_splits(32, 8, 8192, 64, 132) == 3
    assert choose_num_splits(1, 8, 8192, 64, 132, num_warps=32) == 17


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, FP8], ids=["bf16", "fp8"])
@pytest.mark.parametrize("batch,ctx", [(1, 8192), (8, 2048), (64, 700), (256, 513)])
def test_decode_llama3_8b_shapes(device, kv_dtype: torch.dtype, batch: int, ctx: int) -> None:
    """An fp8 cache here takes the word-pair path (kernels.fp8_pairs) with its inline PTX."""
    seq_lens = torch.randint(1, ctx + 1, (batch,)).tolist()
    seq_lens[0] = ctx
    _run(device, torch.bfloat16, seq_lens, 8, 4, 128, 16, kv_dtype, max_seq_len=ctx)


def _fused_rope_case(device, dtype, seq_lens, rotary_dim, head_dim=64, kv_dtype=None,
                     **kwargs) -> None:  # fmt: skip
    """``new_tokens``: rotate q and the new keys, write keys and values, attend, in one kernel,
    vs ``rotary_and_write_kv_cache`` then the plain decode kernel on a copy of the caches:
    the caches end up identical, the outputs agree; a request with seq_len 0 (graph padding,
    slot -1) writes nothing and gets zeros."""
    from kernels.kv_cache import rotary_and_write_kv_cache
    from kernels.paged_attention import NewTokens

    num_kv_heads, group, block_size = 2, 4, 16
    k_cache, v_cache, block_tables = make_paged_kv(
        [max(s, 1) for s in seq_lens], num_kv_heads, head_dim, block_size, kv_dtype or dtype,
        device,
    )  # fmt: skip
    n = len(seq_lens)
    qkv = torch.randn(n, (num_kv_heads * (group + 2)) * head_dim, device=device).to(dtype)
    q, k, v = qkv.split([num_kv_heads * group * head_dim, num_kv_heads * head_dim,
                         num_kv_heads * head_dim], dim=1)  # fmt: skip
    q = q.view(n, -1, head_dim)
    k, v = k.view(n, num_kv_heads, head_dim), v.view(n, num_kv_heads, head_dim)
    positions = torch.tensor([max(s - 1, 0) for s in seq_lens], device=device)
    slots = torch.tensor(
        [int(block_tables[r, (s - 1) // block_size]) * block_size + (s - 1) % block_size
         if s > 0 else -1 for r, s in enumerate(seq_lens)], device=device,
    )  # fmt: skip
    for r, s in enumerate(seq_lens):  # a stale read of the new slot would attend to NaN
        if s > 0:
            block, offset = int(block_tables[r, (s - 1) // block_size]), (s - 1) % block_size
            k_cache[block, offset] = v_cache[block, offset] = float("nan")
    angles = torch.rand(max(seq_lens) + 1, rotary_dim // 2, device=device) * 6.0
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=1)
    lens = int32(seq_lens, device)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    q_rot = rotary_and_write_kv_cache(positions, q, k, v, cos_sin, k_ref, v_ref, slots)
    expected = paged_attention_decode(q_rot, k_ref, v_ref, block_tables, lens, 0.125, **kwargs)
    out = paged_attention_decode(
        q, k_cache, v_cache, block_tables, lens, 0.125,
        new_tokens=NewTokens(positions, k, v, cos_sin, slots), **kwargs,
    )  # fmt: skip
    bits = (lambda t: t.view(torch.uint8)) if kv_dtype == FP8 else (lambda t: t)
    assert torch.equal(bits(k_cache), bits(k_ref)) and torch.equal(bits(v_cache), bits(v_ref))
    assert_close(out, expected, dtype)
    for r, s in enumerate(seq_lens):
        if s == 0:
            assert torch.equal(out[r], torch.zeros_like(out[r]))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_decode_with_new_tokens_matches_unfused(device, dtype, num_splits: int) -> None:
    # 8 splits of 16-key tiles: short requests leave empty splits; 16 and 17 keys put the
    # new key first in its split's tile or alone in a split
    _fused_rope_case(device, dtype, [1, 37, 70, 16, 17, 0], 64, block_n=16,
                     num_splits=num_splits)  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_decode_with_new_tokens_preloaded(device, dtype, num_splits: int) -> None:
    """``preload``: each split's first tile of cached keys read before the PDL wait, the new
    key and value joined in registers (the NaN at the new slot would show a stale read):
    the same caches and output as the unfused path; one split of several tiles (1, 3) reads
    the new key back from the cache after the first tile."""
    _fused_rope_case(device, dtype, [1, 37, 70, 16, 17, 0], 64, block_n=16,
                     num_splits=num_splits, preload=True)  # fmt: skip


def test_decode_with_new_tokens_preloaded_head_dim_128(device: torch.device) -> None:
    """Asked for explicitly, the preload works at any head_dim (the default takes it at
    <= 64 only)."""
    _fused_rope_case(device, torch.bfloat16, [1, 40, 0], 128, 128, block_n=16, num_splits=2,
                     preload=True)  # fmt: skip


@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_decode_preload_gives_the_same_bits(device: torch.device, num_splits: int) -> None:
    from kernels.paged_attention import NewTokens

    seq_lens = [1, 37, 70, 16, 17, 0, 33]
    k_cache, v_cache, block_tables = make_paged_kv(
        [max(s, 1) for s in seq_lens], 2, 64, 16, torch.bfloat16, device
    )
    n = len(seq_lens)
    q = torch.randn(n, 8, 64, device=device).bfloat16()
    k, v = (torch.randn(n, 2, 64, device=device).bfloat16() for _ in range(2))
    positions = torch.tensor([max(s - 1, 0) for s in seq_lens], device=device)
    slots = torch.tensor(
        [int(block_tables[r, (s - 1) // 16]) * 16 + (s - 1) % 16 if s > 0 else -1
         for r, s in enumerate(seq_lens)], device=device,
    )  # fmt: skip
    angles = torch.rand(max(seq_lens) + 1, 32, device=device) * 6.0
    new = NewTokens(positions, k, v, torch.cat([angles.cos(), angles.sin()], dim=1), slots)
    lens = int32(seq_lens, device)
    outs = []
    for preload in (False, True):
        kc, vc = k_cache.clone(), v_cache.clone()
        outs.append((paged_attention_decode(q, kc, vc, block_tables, lens, 0.125, block_n=16,
                                            num_splits=num_splits, new_tokens=new,
                                            preload=preload), kc, vc))  # fmt: skip
    for plain, preloaded in zip(*outs, strict=True):
        assert torch.equal(plain, preloaded)


@pytest.mark.parametrize("head_dim,rotary_dim", [(80, 32), (128, 128)])
def test_decode_with_new_tokens_partial_rotary(device, head_dim: int, rotary_dim: int) -> None:
    _fused_rope_case(device, torch.bfloat16, [5, 90], rotary_dim, head_dim, block_n=32,
                     num_splits=2)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_decode_with_new_tokens_llama8b_shape(device: torch.device, dtype: torch.dtype) -> None:
    """On the card: fp32 caches equal bit for bit needs the same FMAs in both rotary paths."""
    _fused_rope_case(device, dtype, [1, 2000, 8192, 300, 0], 128, 128)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("head_dim", [64, 80, 96])
def test_decode_fp8_cache(device, dtype: torch.dtype, num_splits: int, head_dim: int) -> None:
    """An fp8 (e4m3) cache: keys and values widen exactly. 16-bit queries: fp16 dots, over
    word pairs (even and odd features apart) where head_dim % 32 == 0 (96: masked pairs in a
    128 tile), over bytes otherwise (80)."""
    _run(device, dtype, SEQ_LENS, 2, 4, head_dim, 16, kv_dtype=FP8, block_n=16,
         num_splits=num_splits)  # fmt: skip


@pytest.mark.gpu  # writes fp8 (see test_kv_cache_kernel: the interpreter rounds it wrongly)
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (80, 32)])
def test_decode_with_new_tokens_fp8_cache(device, num_splits: int, head_dim, rotary_dim) -> None:
    """Fused rotary + fp8 write + attention: the same cache bytes and output as the
    rotary-and-write kernel followed by plain decode."""
    _fused_rope_case(device, torch.bfloat16, [1, 37, 70, 16, 17, 0], rotary_dim, head_dim,
                     kv_dtype=FP8, block_n=16, num_splits=num_splits)  # fmt: skip


def _order(seq_lens: torch.Tensor) -> torch.Tensor:
    return torch.argsort(seq_lens, descending=True, stable=True).to(torch.int32)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_order_changes_nothing_but_the_start_order(
    device: torch.device, dtype: torch.dtype, num_splits: int
) -> None:
    """Programs started longest context first (``order``) compute exactly what they compute
    in row order: the same bits, padding rows (seq_len 0) included."""
    seq_lens = [*SEQ_LENS, 0, 5]
    k_cache, v_cache, block_tables = make_paged_kv(
        [max(s, 1) for s in seq_lens], 2, 64, 16, dtype, device
    )
    query = torch.randn(len(seq_lens), 8, 64, device=device).to(dtype)
    lens = int32(seq_lens, device)
    kw = dict(block_n=16, num_splits=num_splits)
    plain = paged_attention_decode(query, k_cache, v_cache, block_tables, lens, 0.125, **kw)
    ordered = paged_attention_decode(
        query, k_cache, v_cache, block_tables, lens, 0.125, order=_order(lens), **kw
    )
    assert torch.equal(ordered, plain)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_with_new_tokens_in_order(device: torch.device, num_splits: int) -> None:
    seq_lens = [1, 37, 70, 16, 17, 0]
    _fused_rope_case(device, torch.float32, seq_lens, 64, block_n=16, num_splits=num_splits,
                     order=_order(int32(seq_lens, device)))  # fmt: skip


def test_decode_order_is_checked(device: torch.device) -> None:
    k_cache, v_cache, block_tables = make_paged_kv([3, 9], 2, 64, 16, torch.float32, device)
    query = torch.randn(2, 4, 64, device=device)
    lens = int32([3, 9], device)
    for bad in (torch.tensor([1, 0], device=device), int32([1, 0, 2], device)):
        with pytest.raises(AssertionError, match=r"order .* must be \[2\] int32"):
            paged_attention_decode(query, k_cache, v_cache, block_tables, lens, 0.1, order=bad)


@pytest.mark.gpu
def test_decode_order_llama8b_w1_shape(device: torch.device) -> None:
    """W1's decode step on the card: 256 contexts of 64-1280 keys, with the fused rotary
    write, ordered vs row order: identical outputs."""
    gen = torch.Generator().manual_seed(0)
    seq_lens = torch.randint(64, 1281, (256,), generator=gen).tolist()
    k_cache, v_cache, block_tables = make_paged_kv(seq_lens, 8, 128, 16, torch.bfloat16, device)
    query = torch.randn(256, 32, 128, device=device, dtype=torch.bfloat16)
    lens = int32(seq_lens, device)
    plain = paged_attention_decode(query, k_cache, v_cache, block_tables, lens, 0.088)
    ordered = paged_attention_decode(
        query, k_cache, v_cache, block_tables, lens, 0.088, order=_order(lens)
    )
    assert torch.equal(ordered, plain)
