"""Sliding-window attention, soft-capped scores and head_dim 256 (Mistral, Gemma 2 / 3) in
the decode and prefill kernels vs the torch reference, and the reference vs a direct
per-query computation of transformers' rule (a query at position p sees keys (p - W, p])."""

import math

import pytest
import torch
from kernel_testing import (
    assert_close,
    int32,
    make_paged_kv,
    query_start_loc,
    ref_attention,
)
from test_decode_attention import _fused_rope_case

from kernels.attention import paged_attention
from kernels.paged_attention import paged_attention_decode
from kernels.prefill_attention import prefill_attention

BF16, FP32 = torch.bfloat16, torch.float32


def _direct(q, k, v, positions, scale, window, softcap):  # noqa: ANN001, ANN202
    """One request's attention, query by query: q [q_len, heads, d] at ``positions``, k / v
    [ctx, kv_heads, d] of every position, in fp64."""
    group = q.shape[1] // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    for i, p in enumerate(positions):
        lo = max(0, p - window + 1) if window else 0
        for h in range(q.shape[1]):
            keys, values = k[lo : p + 1, h // group].double(), v[lo : p + 1, h // group].double()
            x = keys @ q[i, h].double() * scale
            if softcap:
                x = softcap * torch.tanh(x / softcap)
            out[i, h] = x.softmax(0) @ values
    return out


@pytest.mark.parametrize("window,softcap", [(0, 0.0), (5, 0.0), (16, 0.0), (3, 2.0), (40, 0.5)])
def test_reference_is_the_window_rule(window: int, softcap: float) -> None:
    """The reference (also the CPU path) over a paged cache, prefill with a prefix hit and a
    decode row, against keys (p - W, p] attended to directly; 0.5 caps hard (scores of ~3)."""
    torch.manual_seed(0)
    seq_lens, q_lens, heads, kv_heads, d, bs = [37, 20], [9, 1], 4, 2, 8, 4
    k_cache, v_cache, tables = make_paged_kv(seq_lens, kv_heads, d, bs, FP32, torch.device("cpu"))
    query = torch.randn(sum(q_lens), heads, d)
    qsl, lens = query_start_loc(q_lens, torch.device("cpu")), int32(seq_lens, torch.device("cpu"))
    out = ref_attention(query, k_cache, v_cache, tables, lens, qsl, 0.7, window, softcap)
    for r, (s, n) in enumerate(zip(seq_lens, q_lens, strict=True)):
        pos = torch.arange(s)
        slots = tables[r].long()[pos // bs] * bs + pos % bs
        k = k_cache.view(-1, kv_heads, d)[slots]
        v = v_cache.view(-1, kv_heads, d)[slots]
        rows = slice(int(qsl[r]), int(qsl[r + 1]))
        expected = _direct(query[rows], k, v, range(s - n, s), 0.7, window, softcap)
        torch.testing.assert_close(out[rows].double(), expected, atol=1e-5, rtol=1e-5)


def _decode(device, dtype, seq_lens, window, softcap=0.0, head_dim=32, kv_dtype=None,
            **kwargs) -> None:  # fmt: skip
    num_kv_heads, group, block_size = 2, 4, 16
    k_cache, v_cache, tables = make_paged_kv(
        seq_lens, num_kv_heads, head_dim, block_size, kv_dtype or dtype, device
    )
    query = torch.randn(len(seq_lens), num_kv_heads * group, head_dim, device=device).to(dtype)
    lens, scale = int32(seq_lens, device), head_dim**-0.5
    out = paged_attention_decode(query, k_cache, v_cache, tables, lens, scale,
                                 sliding_window=window, softcap=softcap, **kwargs)  # fmt: skip
    qsl = query_start_loc([1] * len(seq_lens), device)
    assert_close(out, ref_attention(query, k_cache, v_cache, tables, lens, qsl, scale, window,
                                    softcap), dtype)  # fmt: skip


# 70 keys in tiles of 16: a window of 38 starts at key 32 (a tile's first), 39 at 31 (one key
# in the tile before), 16 at 54; 1 sees the query's own key; 100 covers every context.
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("window", [1, 16, 38, 39, 100])
@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_decode_window(device: torch.device, dtype, window: int, num_splits: int) -> None:
    """Split-K shares out the window's tiles only: 8 splits leave empty ones past them."""
    _decode(device, dtype, [1, 37, 70, 16, 48], window, block_n=16, num_splits=num_splits)


@pytest.mark.parametrize("window,softcap", [(0, 1.0), (20, 1.0), (20, 30.0)])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_softcap(device: torch.device, window: int, softcap: float, num_splits) -> None:
    """A cap of 1 (scores of ~3) changes the result well past the tolerance; 30 barely."""
    _decode(device, FP32, [1, 37, 70], window, softcap, block_n=16, num_splits=num_splits)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("preload", [False, True])
def test_decode_window_with_new_tokens(device: torch.device, num_splits, preload) -> None:
    """The fused rotary + cache write + attention (and its preload of the first tile) over a
    window, against the unfused kernels: the window's first tile is the one preloaded."""
    _fused_rope_case(device, FP32, [1, 37, 70, 16, 17, 0], 64, block_n=16,
                     num_splits=num_splits, preload=preload, sliding_window=20,
                     softcap=2.0)  # fmt: skip


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_window_fp8_word_pairs(device: torch.device, num_splits: int) -> None:
    """An fp8 cache under fp16 queries (read as int16 word pairs) takes the window and cap."""
    _decode(device, torch.float16, [1, 37, 70], 20, 2.0, kv_dtype=torch.float8_e4m3fn,
            block_n=16, num_splits=num_splits)  # fmt: skip


def _prefill(device, dtype, q_lens, seq_lens, window, softcap=0.0, head_dim=32, group=4,
             **kwargs) -> None:  # fmt: skip
    num_kv_heads, block_size = 2, 16
    k_cache, v_cache, tables = make_paged_kv(
        seq_lens, num_kv_heads, head_dim, block_size, dtype, device
    )
    query = torch.randn(sum(q_lens), num_kv_heads * group, head_dim, device=device).to(dtype)
    lens, qsl, scale = int32(seq_lens, device), query_start_loc(q_lens, device), head_dim**-0.5
    out = prefill_attention(query, k_cache, v_cache, tables, lens, qsl, scale,
                            sliding_window=window, softcap=softcap, **kwargs)  # fmt: skip
    assert_close(out, ref_attention(query, k_cache, v_cache, tables, lens, qsl, scale, window,
                                    softcap), dtype)  # fmt: skip


# whole prompts, a chunk / prefix hit (queries at the end of a longer context), a decode row
PREFILL = ([40, 9, 1, 33], [40, 50, 17, 70])


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("window", [1, 5, 16, 17, 40, 200])
@pytest.mark.parametrize("block_m,block_n", [(16, 16), (8, 32)])
def test_prefill_window(device: torch.device, dtype, window: int, block_m, block_n) -> None:
    """Windows smaller than a query tile (1, 5: no key is in every row's window), at and
    past a key tile's edge (16, 17), past the longest context (200)."""
    _prefill(device, dtype, *PREFILL, window, block_m=block_m, block_n=block_n)


@pytest.mark.parametrize("window,softcap", [(0, 1.0), (12, 1.0), (12, 50.0)])
@pytest.mark.parametrize("group", [1, 2])
def test_prefill_softcap(device: torch.device, window: int, softcap: float, group) -> None:
    _prefill(device, FP32, *PREFILL, window, softcap, group=group, block_m=8, block_n=16)


def test_mixed_step_window(device: torch.device) -> None:
    """The model's entry point: decode rows through the decode kernel, the rest prefill, the
    same window and cap in both."""
    seq_lens, q_lens = [37, 70, 40, 50], [1, 1, 40, 9]
    k_cache, v_cache, tables = make_paged_kv(seq_lens, 2, 32, 16, FP32, device)
    query = torch.randn(sum(q_lens), 8, 32, device=device)
    lens, qsl = int32(seq_lens, device), query_start_loc(q_lens, device)
    out = paged_attention(query, k_cache, v_cache, tables, lens, qsl, 0.2, 40, 70,
                          num_decode_rows=2, sliding_window=19, softcap=3.0)  # fmt: skip
    assert_close(out, ref_attention(query, k_cache, v_cache, tables, lens, qsl, 0.2, 19, 3.0),
                 FP32)  # fmt: skip


@pytest.mark.parametrize("window", [0, 24])
def test_head_dim_256(device: torch.device, window: int) -> None:
    """Gemma's heads (256 features, 2 query heads per kv head) at the default tiles."""
    _decode(device, BF16, [1, 37, 70], window, 50.0, head_dim=256, num_splits=2)
    _prefill(device, BF16, *PREFILL, window, 50.0, head_dim=256, group=2)


def test_score_options_are_checked(device: torch.device) -> None:
    k_cache, v_cache, tables = make_paged_kv([4], 1, 16, 16, FP32, device)
    q, lens = torch.randn(1, 1, 16, device=device), int32([4], device)
    with pytest.raises(AssertionError, match="sliding_window -1 must be >= 0"):
        paged_attention_decode(q, k_cache, v_cache, tables, lens, 1.0, sliding_window=-1)
    with pytest.raises(AssertionError, match="softcap -2.0 must be >= 0"):
        prefill_attention(q, k_cache, v_cache, tables, lens, query_start_loc([1], device), 1.0,
                          softcap=-2.0)  # fmt: skip


# ---- real sizes on a GPU ---------------------------------------------------------------------
GEMMA2_9B = dict(num_kv_heads=8, group=2, head_dim=256)  # 16 heads
GEMMA3_4B = dict(num_kv_heads=4, group=2, head_dim=256)  # 8 heads (window 1024)


@pytest.mark.gpu
@pytest.mark.parametrize("shape,window,softcap", [(GEMMA2_9B, 4096, 50.0),
                                                  (GEMMA3_4B, 1024, 0.0)])  # fmt: skip
@pytest.mark.parametrize("batch", [1, 64])
def test_gpu_decode_gemma_shapes(device, shape: dict, window: int, softcap: float, batch) -> None:
    """Contexts of 1-9000 keys (past the window, some at its edge), the split count the
    launcher picks (split-K for few requests)."""
    g = torch.Generator().manual_seed(batch)
    seq_lens = torch.randint(1, 9000, (batch,), generator=g).tolist()
    seq_lens[0] = window + 1
    kv, d = shape["num_kv_heads"], shape["head_dim"]
    k_cache, v_cache, tables = make_paged_kv(seq_lens, kv, d, 16, BF16, device)
    query = torch.randn(batch, kv * shape["group"], d, device=device).to(BF16)
    lens, scale = int32(seq_lens, device), 256**-0.5
    out = paged_attention_decode(query, k_cache, v_cache, tables, lens, scale,
                                 sliding_window=window, softcap=softcap)  # fmt: skip
    qsl = query_start_loc([1] * batch, device)
    expected = ref_attention(query, k_cache, v_cache, tables, lens, qsl, scale, window, softcap)
    assert_close(out, expected, BF16)


@pytest.mark.gpu
@pytest.mark.parametrize("shape,window,softcap", [(GEMMA2_9B, 4096, 50.0),
                                                  (GEMMA3_4B, 1024, 0.0)])  # fmt: skip
def test_gpu_prefill_gemma_shapes(device, shape: dict, window: int, softcap: float) -> None:
    """An 8192-token prompt and a 2048-token chunk after 6000 cached keys."""
    q_lens, seq_lens = [8192, 2048], [8192, 8048]
    kv, d = shape["num_kv_heads"], shape["head_dim"]
    k_cache, v_cache, tables = make_paged_kv(seq_lens, kv, d, 16, BF16, device)
    query = torch.randn(sum(q_lens), kv * shape["group"], d, device=device).to(BF16)
    lens, qsl, scale = int32(seq_lens, device), query_start_loc(q_lens, device), 256**-0.5
    out = prefill_attention(query, k_cache, v_cache, tables, lens, qsl, scale,
                            sliding_window=window, softcap=softcap)  # fmt: skip
    expected = ref_attention(query, k_cache, v_cache, tables, lens, qsl, scale, window, softcap)
    assert_close(out, expected, BF16)
    assert math.isfinite(float(out.float().abs().max()))
