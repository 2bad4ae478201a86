"""What the attention launchers pick on the host (tiles, warps, splits, grids, the preload
and word-pair paths), recorded instead of launched: the results do not depend on these
choices, so the numeric tests cannot see a wrong one."""

import pytest
import torch
from kernel_testing import int32, make_paged_kv

import kernels.paged_attention as pa
import kernels.prefill_attention as pf
from kernels.decode_splits import choose_num_splits
from kernels.launch import num_sms

FP8 = torch.float8_e4m3fn


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kw)`` records."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple, tuple, dict]] = []

    def __getitem__(self, grid: tuple):
        return lambda *args, **kw: self.calls.append((tuple(grid), args, kw))


@pytest.fixture
def decode(monkeypatch: pytest.MonkeyPatch) -> tuple[_Recorder, list]:
    kernel, combines = _Recorder(), []
    monkeypatch.setattr(pa, "_decode_kernel", kernel)
    monkeypatch.setattr(pa, "combine_splits", lambda *args: combines.append(args))
    return kernel, combines


def _decode_inputs(num_reqs: int, head_dim: int, kv_dtype: torch.dtype = torch.bfloat16,
                   dtype: torch.dtype = torch.bfloat16):  # fmt: skip
    k_cache, v_cache, tables = make_paged_kv([40] * num_reqs, 2, head_dim, 16, kv_dtype, "cpu")
    query = torch.randn(num_reqs, 8, head_dim).to(dtype)
    kv = torch.randn(num_reqs, 2, head_dim).to(dtype)
    new = pa.NewTokens(torch.full((num_reqs,), 39), kv, kv.clone(),
                       torch.zeros(64, head_dim), torch.arange(num_reqs))  # fmt: skip
    return query, k_cache, v_cache, tables, int32([40] * num_reqs, "cpu"), new


def _picked(kernel: _Recorder) -> tuple:
    grid, _, kw = kernel.calls[-1]
    return grid, kw["BLOCK_N"], kw["num_warps"], kw["PRELOAD"], kw["PAIRS"], kw["ORDERED"]


def test_decode_lone_request_takes_one_warp_tiles_of_32_keys(decode) -> None:
    """One request bringing its new key at head_dim <= 64: one-warp programs of 32 keys that
    preload; splits aimed at 16 programs an SM over the table's capacity (4 blocks: 64
    keys, two tiles)."""
    kernel, combines = decode
    q, kc, vc, tables, lens, new = _decode_inputs(1, 64)
    pa.paged_attention_decode(q, kc, vc, tables, lens, 0.1, new_tokens=new)
    splits = choose_num_splits(1, 2, tables.shape[1] * 16, 32, num_sms(q.device), 1)
    assert splits == 2
    assert _picked(kernel) == ((1, 2, 2), 32, 1, True, False, False)
    assert combines[-1][5:] == (32, 0)  # the reduce counts tiles of the kernel's block_n
    # head_dim 128, or two requests, or no new key: four warps, 64 keys, no preload
    for num_reqs, head_dim, with_new in ((1, 128, True), (2, 64, True), (1, 64, False)):
        q, kc, vc, tables, lens, new = _decode_inputs(num_reqs, head_dim)
        nt = new if with_new else None
        pa.paged_attention_decode(q, kc, vc, tables, lens, 0.1, new_tokens=nt, max_seq_len=40)
        assert _picked(kernel) == ((num_reqs, 2, 1), 64, 4, False, False, False), (
            num_reqs, head_dim, with_new,
        )  # fmt: skip
    # an explicit preload needs the new tokens
    pa.paged_attention_decode(q, kc, vc, tables, lens, 0.1, preload=True)
    assert _picked(kernel)[3] is False


@pytest.mark.parametrize(
    "head_dim,pairs", [(64, True), (32, True), (48, False), (80, False), (96, True)]
)
def test_decode_fp8_word_pairs_need_whole_rows_of_32_features(decode, head_dim, pairs) -> None:
    """A 16-bit query over an fp8 cache reads it as int16 word pairs where head_dim % 32 ==
    0; pairs never preload (even asked to), a lone request keeps four-warp tiles and a batch
    takes PAIRS_WARPS."""
    kernel, _ = decode
    q, kc, vc, tables, lens, new = _decode_inputs(1, head_dim, kv_dtype=FP8)
    pa.paged_attention_decode(q, kc, vc, tables, lens, 0.1, new_tokens=new, num_splits=1,
                              preload=True)  # fmt: skip
    _, block_n, warps, preload, got_pairs, _ = _picked(kernel)
    lone = not pairs and head_dim <= 64
    assert got_pairs is pairs and preload is not pairs
    assert (block_n, warps) == ((32, 1) if lone else (64, 4))
    words = kernel.calls[-1][1][3]
    assert words.dtype == (torch.int16 if pairs else FP8)
    for num_reqs in (2, 3):  # (two: the smallest batch)
        q, kc, vc, tables, lens, _ = _decode_inputs(num_reqs, head_dim, kv_dtype=FP8)
        pa.paged_attention_decode(q, kc, vc, tables, lens, 0.1)
        assert _picked(kernel)[1:3] == (64, pa.PAIRS_WARPS if pairs else 4), num_reqs
    assert pa.PAIRS_WARPS == 2


def test_decode_splits_follow_max_seq_len_else_the_table(decode) -> None:
    kernel, combines = decode
    q, kc, vc, tables, lens, _ = _decode_inputs(2, 64)  # table: 4 blocks of 16, 64 keys
    pa.paged_attention_decode(q, kc, vc, tables, lens, 0.1)
    assert kernel.calls[-1][0] == (2, 2, 1)  # 64 keys: one tile of 64
    pa.paged_attention_decode(q, kc, vc, tables, lens, 0.1, max_seq_len=1024)
    assert kernel.calls[-1][0] == (2, 2, 16) == (2, 2, choose_num_splits(2, 2, 1024, 64, 132))
    assert kernel.calls[-1][2]["SPLIT"] and combines[-1][0].shape == (2, 8, 16)


def test_decode_num_splits_is_bounded(decode) -> None:
    q, kc, vc, tables, lens, _ = _decode_inputs(1, 64)
    for bad in (0, 129):
        with pytest.raises(AssertionError, match=rf"num_splits {bad} must be in \[1, 128\]"):
            pa.paged_attention_decode(q, kc, vc, tables, lens, 0.1, num_splits=bad)
    with pytest.raises(AssertionError, match=r"decode: seq_lens \(2,\) vs query"):
        pa.paged_attention_decode(q, kc, vc, tables.repeat(2, 1), int32([40, 40], "cpu"), 0.1)


def test_decode_order_of_one_request_is_dropped(decode) -> None:
    kernel, _ = decode
    q, kc, vc, tables, lens, _ = _decode_inputs(1, 64)
    pa.paged_attention_decode(q, kc, vc, tables, lens, 0.1, order=int32([0], "cpu"),
                              num_splits=1)  # fmt: skip
    assert _picked(kernel)[0] == (1, 2, 1) and not _picked(kernel)[-1]
    q, kc, vc, tables, lens, _ = _decode_inputs(3, 64)
    pa.paged_attention_decode(q, kc, vc, tables, lens, 0.1, order=int32([2, 0, 1], "cpu"),
                              num_splits=1)  # fmt: skip
    assert _picked(kernel)[0] == (2, 3, 1) and _picked(kernel)[-1]
    meta = torch.empty(3, dtype=torch.int32, device="meta")
    with pytest.raises(AssertionError, match=r"order on meta, query on cpu"):
        pa.paged_attention_decode(q, kc, vc, tables, lens, 0.1, order=meta)


def test_new_tokens_checks(decode) -> None:
    q, kc, vc, tables, lens, new = _decode_inputs(2, 64)
    cases = {
        r"key torch.float32 / value torch.float32 vs query torch.bfloat16": dict(
            key=new.key.float(), value=new.value.float()),
        r"key \(2, 2, 32\) / value \(2, 2, 32\) vs \(2, 2, 64\)": dict(
            key=new.key[..., :32], value=new.value[..., :32]),
        r"rotary_dim 66 must be even and <= head_dim 64": dict(
            cos_sin_cache=torch.zeros(64, 66)),
        r"positions torch.float32 \(1,\) must be a contiguous int32 / int64": dict(
            positions=new.positions.float()),
    }  # fmt: skip
    for message, change in cases.items():
        bad = pa.NewTokens(**{**new.__dict__, **change})
        with pytest.raises(AssertionError, match=message):
            pa.paged_attention_decode(q, kc, vc, tables, lens, 0.1, new_tokens=bad)


@pytest.fixture
def prefill(monkeypatch: pytest.MonkeyPatch) -> _Recorder:
    kernel = _Recorder()
    monkeypatch.setattr(pf, "_prefill_kernel", kernel)
    return kernel


def _prefill(kernel: _Recorder, queries_per_kv: int, dtype: torch.dtype, num_tokens: int = 70,
             **kw) -> tuple:  # fmt: skip
    k_cache, v_cache, tables = make_paged_kv([num_tokens], 2, 64, 16, dtype, "cpu")
    q = torch.randn(num_tokens, 2 * queries_per_kv, 64).to(dtype)
    qsl = int32([0, num_tokens], "cpu")
    pf.prefill_attention(q, k_cache, v_cache, tables, int32([num_tokens], "cpu"), qsl, 0.1, **kw)
    grid, _, c = kernel.calls[-1]
    return grid, c["GROUP"], c["BLOCK_M"], c["BLOCK_N"], c["num_warps"], c["num_stages"]


def test_prefill_default_tiles_and_groups(prefill) -> None:
    """Grouped heads for 2^k <= 16 query heads per kv head in 16-bit (128 rows a tile), one
    head otherwise and in fp32; grid (head groups, query tiles + requests), longest first."""
    bf16, fp32 = torch.bfloat16, torch.float32
    assert _prefill(prefill, 4, bf16) == ((2, 70 // 32 + 1), 4, 32, 64, 8, 2)
    assert _prefill(prefill, 16, bf16) == ((2, 70 // 8 + 1), 16, 8, 64, 8, 2)
    assert _prefill(prefill, 32, bf16) == ((64, 70 // 128 + 1), 1, 128, 64, 4, 3)
    assert _prefill(prefill, 3, bf16) == ((6, 1), 1, 128, 64, 4, 3)
    assert _prefill(prefill, 4, fp32) == ((8, 2), 1, 64, 32, 4, 2)
    assert _prefill(prefill, 4, fp32, group=2) == ((4, 3), 2, 32, 32, 4, 2)
    assert _prefill(prefill, 4, fp32, longest_first=False) == ((2, 8), 1, 64, 32, 4, 2)


def test_prefill_given_tiles_are_kept(prefill) -> None:
    """A given block_m counts tokens of one head unless a group is given too; given tiles,
    warps and stages are launched as given."""
    got = _prefill(prefill, 4, torch.bfloat16, block_m=16, block_n=32, num_warps=2,
                   num_stages=1)  # fmt: skip
    assert got == ((8, 70 // 16 + 1), 1, 16, 32, 2, 1)
    assert _prefill(prefill, 4, torch.bfloat16, block_m=16, group=2)[1:3] == (2, 16)


def test_prefill_checks(prefill) -> None:
    with pytest.raises(AssertionError, match=r"group 3 must be a power of 2 dividing 6"):
        _prefill(prefill, 6, torch.float32, group=3)
    k_cache, v_cache, tables = make_paged_kv([5], 2, 64, 16, torch.float32, "cpu")
    q = torch.randn(5, 4, 64)
    message = r"query_start_loc \(3,\) must be \[num_reqs \+ 1 = 2\]"
    with pytest.raises(AssertionError, match=message):
        pf.prefill_attention(q, k_cache, v_cache, tables, int32([5], "cpu"),
                             int32([0, 5, 5], "cpu"), 0.1)  # fmt: skip


def test_prefill_launches_in_order_past_the_grid_y_limit(prefill) -> None:
    """Longest-first puts the query tiles on the grid's y axis, which CUDA caps at 65535:
    one more and they stay on x, launched in order."""
    k_cache, v_cache, tables = make_paged_kv([65535], 1, 16, 16, torch.bfloat16, "cpu")
    for num_tokens, grid, longest_first in ((65534, (1, 65535), True), (65535, (65536, 1), False)):
        q = torch.zeros(num_tokens, 1, 16, dtype=torch.bfloat16)
        lens, qsl = int32([num_tokens], "cpu"), int32([0, num_tokens], "cpu")
        pf.prefill_attention(q, k_cache, v_cache, tables, lens, qsl, 0.1, block_m=1)
        assert prefill.calls[-1][0] == grid
        assert prefill.calls[-1][2]["LONGEST_FIRST"] is longest_first
