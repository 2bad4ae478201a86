"""Varlen causal prefill kernel (paged, prefix-cached, chunked) vs the torch reference."""

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

from kernels.attention import paged_attention
from kernels.prefill_attention import prefill_attention

# (q_lens, seq_lens): q_len == seq_len is a fresh prefill, q_len < seq_len a prefix-cache hit
# or a later prefill chunk, q_len == 1 a decode row, q_len == 0 an idle request.
SCENARIOS = {
    "prefill": ([5, 33, 20], [5, 33, 20]),
    "prefix_hit": ([7, 16, 9], [39, 48, 23]),
    "mixed": ([1, 19, 0, 40], [17, 50, 3, 40]),
}


def _run(
    device: torch.device,
    dtype: torch.dtype,
    q_lens: list[int],
    seq_lens: list[int],
    num_kv_heads: int,
    queries_per_kv: int,
    head_dim: int,
    block_size: int,
    kv_dtype: torch.dtype | None = None,
    **kwargs: int,
) -> None:
    k_cache, v_cache, block_tables = make_paged_kv(
        seq_lens, num_kv_heads, head_dim, block_size, kv_dtype or dtype, device
    )
    query = torch.randn(sum(q_lens), num_kv_heads * queries_per_kv, head_dim, device=device).to(
        dtype
    )
    lens, qsl = int32(seq_lens, device), query_start_loc(q_lens, device)
    scale = head_dim**-0.5
    out = prefill_attention(query, k_cache, v_cache, block_tables, lens, qsl, scale, **kwargs)
    expected = ref_attention(query, k_cache, v_cache, block_tables, lens, qsl, scale)
    assert out.shape == query.shape and out.dtype == dtype
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize(
    "kv_heads,queries_per_kv,group",
    [(1, 3, 1), (2, 4, 2), (2, 4, 4), (1, 6, 2)],
    ids=["head", "g2of4", "g4of4", "g2of6"],
)
def test_prefill_matches_reference(
    device: torch.device,
    dtype: torch.dtype,
    scenario: str,
    block_size: int,
    kv_heads: int,
    queries_per_kv: int,
    group: int,
) -> None:
    """One query head per program, or ``group`` heads of one kv head (rows = tokens x heads:
    the causal mask per token, partial tiles, prefix hits and idle requests alike)."""
    q_lens, seq_lens = SCENARIOS[scenario]
    _run(device, dtype, q_lens, seq_lens, kv_heads, queries_per_kv, 64, block_size,
         block_m=16 // group, block_n=16, group=group)  # fmt: skip


@pytest.mark.parametrize("group", [1, 4])
def test_prefill_launch_order_does_not_change_the_result(device: torch.device, group: int) -> None:
    """The last query tiles launched first (the default) or in order: the same bits, each
    program computing the same tile either way (prefill, prefix hits, idle requests)."""
    q_lens, seq_lens = SCENARIOS["mixed"]
    k_cache, v_cache, block_tables = make_paged_kv(seq_lens, 2, 32, 16, torch.float16, device)
    query = torch.randn(sum(q_lens), 8, 32, device=device).to(torch.float16)
    args = (query, k_cache, v_cache, block_tables, int32(seq_lens, device),
            query_start_loc(q_lens, device), 32**-0.5)  # fmt: skip
    tiles = dict(block_m=16 // group, block_n=16, group=group)
    first = prefill_attention(*args, **tiles, longest_first=True)
    in_order = prefill_attention(*args, **tiles, longest_first=False)
    assert torch.equal(first, in_order)


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128])
@pytest.mark.parametrize("group", [1, 4])
def test_prefill_head_dims_and_gqa(device: torch.device, head_dim: int, group: int) -> None:
    q_lens, seq_lens = SCENARIOS["mixed"]
    _run(device, torch.bfloat16, q_lens, seq_lens, 1, group, head_dim, 16, block_m=32,
         block_n=16)  # fmt: skip


@pytest.mark.parametrize("block_m,block_n", [(16, 32), (32, 16)])
def test_prefill_tile_shapes(device: torch.device, block_m: int, block_n: int) -> None:
    """Key tiles wider than a cache block, and query tiles spanning several key tiles."""
    # Context starts 30 and 14: the first query row sits just before a key-tile boundary.
    _run(device, torch.float32, [3, 45, 5], [17, 45, 35], 2, 2, 64, 16, block_m=block_m,
         block_n=block_n)  # fmt: skip


@pytest.mark.parametrize(
    "head_dim,queries_per_kv", [(64, 4), (128, 4), (128, 8), (64, 16), (80, 4), (96, 2)]
)
def test_prefill_default_config_groups_heads(
    device: torch.device, head_dim: int, queries_per_kv: int
) -> None:
    """2^k query heads per kv head take the default grouped tiles (128 rows: Llama-3's 4
    heads x 32 tokens, 8 x 16, 16 x 8)."""
    q_lens, seq_lens = SCENARIOS["mixed"]
    _run(device, torch.bfloat16, q_lens, seq_lens, 1, queries_per_kv, head_dim, 16)


# One varlen batch of edge cases: a chunk ending exactly at a cache block and key tile
# (16 of 32), cached context longer than the new tokens (3 of 64) and shorter (40 of 45),
# one-token sequences (1 of 1, 1 of 2), an idle request, a whole 128-token prompt.
EDGES = ([16, 3, 1, 40, 1, 0, 128], [32, 64, 1, 45, 2, 7, 128])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("queries_per_kv,head_dim", [(3, 32), (4, 32), (32, 32), (3, 80)])
def test_prefill_default_config_at_edges(
    device: torch.device, dtype: torch.dtype, queries_per_kv: int, head_dim: int
) -> None:
    """The launcher's own tiles and head grouping at the edge cases: one head per program
    for 3 or 32 query heads per kv head and in fp32 (128-token tiles; 64 for head_dim 80
    and fp32), else 4 heads x 32 tokens."""
    _run(device, dtype, *EDGES, 1, queries_per_kv, head_dim, 16)


def test_prefill_empty_batch(device: torch.device) -> None:
    k_cache, v_cache, block_tables = make_paged_kv([3], 2, 32, 16, torch.float32, device)
    query = torch.randn(0, 4, 32, device=device)
    args = (query, k_cache, v_cache, block_tables[:0], int32([], device),
            query_start_loc([], device), 0.1)  # fmt: skip
    assert prefill_attention(*args).shape == (0, 4, 32)
    for max_query_len in (0, 1):  # either kernel's launcher
        assert paged_attention(*args, max_query_len=max_query_len).shape == (0, 4, 32)


@pytest.mark.parametrize("group", [0, 3, 8])
def test_prefill_rejects_a_group_that_does_not_divide(device: torch.device, group: int) -> None:
    with pytest.raises(AssertionError, match=f"group {group} must be a power of 2 dividing 4"):
        _run(device, torch.float32, [5], [5], 1, 4, 64, 16, group=group)


def test_prefill_single_long_request_default_config(device: torch.device) -> None:
    _run(device, torch.float16, [70], [70], 1, 2, 64, 16)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dispatcher_decode_and_prefill_agree(device: torch.device, dtype: torch.dtype) -> None:
    """A pure-decode batch gives the same result through either kernel."""
    seq_lens = [1, 37, 70]
    k_cache, v_cache, block_tables = make_paged_kv(seq_lens, 2, 64, 16, dtype, device)
    query = torch.randn(3, 6, 64, device=device).to(dtype)
    lens, qsl = int32(seq_lens, device), query_start_loc([1, 1, 1], device)
    args = (query, k_cache, v_cache, block_tables, lens, qsl, 0.125)
    decode = paged_attention(*args, max_query_len=1)
    prefill = paged_attention(*args, max_query_len=2)  # any value > 1 takes the prefill path
    expected = ref_attention(*args)
    assert_close(decode, expected, dtype)
    assert_close(prefill, expected, dtype)


def _mixed_batch(device: torch.device, dtype: torch.dtype, num_heads: int = 6) -> tuple:
    """``paged_attention``'s inputs for three decode rows ahead of two prefill rows."""
    q_lens, seq_lens = [1, 1, 1, 19, 40], [17, 50, 3, 50, 40]
    k_cache, v_cache, block_tables = make_paged_kv(seq_lens, 2, 64, 16, dtype, device)
    query = torch.randn(sum(q_lens), num_heads, 64, device=device).to(dtype)
    lens, qsl = int32(seq_lens, device), query_start_loc(q_lens, device)
    return query, k_cache, v_cache, block_tables, lens, qsl, 0.125


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("num_heads", [6, 8])  # 3 / 4 heads per kv head (4: grouped prefill)
def test_dispatcher_splits_leading_decode_rows(
    device: torch.device, dtype: torch.dtype, num_heads: int
) -> None:
    """A mixed batch whose first rows are decodes: those go through the decode kernel, the
    rest through the prefill kernel, and the result matches the reference."""
    args = _mixed_batch(device, dtype, num_heads)
    out = paged_attention(*args, max_query_len=40, num_decode_rows=3)
    assert_close(out, ref_attention(*args), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_prefill_real_sizes(device: torch.device, head_dim: int) -> None:
    q_lens, seq_lens = [1000, 513, 1, 2048], [1000, 1700, 300, 2048]
    _run(device, torch.bfloat16, q_lens, seq_lens, 8, 4, head_dim, 16)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("queries_per_kv,group", [(3, 1), (4, 4)])
def test_prefill_fp8_cache(
    device: torch.device, dtype: torch.dtype, scenario: str, queries_per_kv: int, group: int
) -> None:
    """An fp8 (e4m3) cache: keys and values widen exactly (16-bit queries: fp16 dots)."""
    q_lens, seq_lens = SCENARIOS[scenario]
    _run(device, dtype, q_lens, seq_lens, 1, queries_per_kv, 64, 16,
         kv_dtype=torch.float8_e4m3fn, block_m=16 // group, block_n=16, group=group)  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dispatcher_orders_only_the_decode_rows(device: torch.device, dtype: torch.dtype) -> None:
    """A mixed batch's ``decode_order`` covers the leading decode rows only (as DeviceInputs
    stages it): same result as row order and the reference; the prefill rows untouched."""
    args = _mixed_batch(device, dtype)
    plain = paged_attention(*args, max_query_len=40, num_decode_rows=3)
    for order in ([1, 0, 2], [0]):  # three decode rows; one (dropped: row order)
        d = len(order)
        out = paged_attention(*args, max_query_len=40, num_decode_rows=d,
                              decode_order=int32(order, device))  # fmt: skip
        assert_close(out, ref_attention(*args), dtype)
        if d == 3:
            assert torch.equal(out, plain)
    with pytest.raises(AssertionError, match="order"):  # order of all rows: rejected
        paged_attention(*args, max_query_len=40, num_decode_rows=3,
                        decode_order=int32([1, 0, 2, 3, 4], device))  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dispatcher_writes_into_out(device: torch.device, dtype: torch.dtype) -> None:
    """``out`` (piecewise graphs' static buffer) is written and returned on each path:
    mixed, prefill only, decode only; its rows past the step's tokens are left alone."""
    args = _mixed_batch(device, dtype)
    query, *rest = args
    expected = paged_attention(*args, max_query_len=40, num_decode_rows=3)
    buffer = torch.full((query.shape[0] + 5, *query.shape[1:]), 7.0, device=device).to(dtype)
    out = buffer[: query.shape[0]]
    for d in (3, 0):
        got = paged_attention(*args, max_query_len=40, num_decode_rows=d, out=out)
        assert got.data_ptr() == out.data_ptr()
        assert_close(got, expected, dtype)
    qsl = rest[4]  # the prefill rows' query_start_loc, as a step passes it once for all layers
    got = paged_attention(*args, max_query_len=40, num_decode_rows=3,
                          prefill_query_start_loc=qsl[3:] - 3)  # fmt: skip
    assert torch.equal(got, expected)
    assert (buffer[query.shape[0] :] == 7.0).all()
    k_cache, v_cache, block_tables, lens, qsl, scale = rest
    decode = (query[:3], k_cache, v_cache, block_tables[:3], lens[:3], qsl[:4], scale)
    got = paged_attention(*decode, max_query_len=1, out=out[:3])
    assert got.data_ptr() == out.data_ptr()
    assert_close(got, ref_attention(*decode), dtype)
