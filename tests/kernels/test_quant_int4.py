"""W4A16 int4 matmul kernel vs its torch reference (``reference.w4a16_linear``)."""

import pytest
import torch
import torch.nn.functional as F
from kernel_testing import DTYPE_IDS, DTYPES, make_int4, small_card

from kernels import reference
from kernels.int4_words import split_counters
from kernels.quant_int4 import (
    GEMV_MAX_M,
    W4A16Config,
    int4_dequantize,
    w4a16_gemv,
    w4a16_matmul,
)
from kernels.quant_int4_mma import MMA_BLOCK_K, default_mma_config, w4a16_mma

# The GEMV scales each group's fp32 partial product, the reference dequantizes first (one
# fp32 rounding per weight); the other kernels may round the weight to x's dtype (as
# a float layer's: the tensor-core kernel's groups under 128, and past MMA_MAX_M rows): the
# output dtype's rounding dominates.
TOL = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 1.6e-2, "rtol": 1.6e-2},
}


def check(x, weights, group_size, bias=None, config=None, kernel=w4a16_matmul) -> torch.Tensor:
    out = kernel(x, *weights, group_size, bias, config)
    ref = reference.w4a16_linear(x, *weights, group_size, bias)
    assert out.dtype == x.dtype and out.shape == ref.shape
    assert not out.isnan().any(), "kernel left unwritten elements"
    tol = dict(TOL[x.dtype])
    rows = x[..., 0].numel()  # the GEMV (called, or picked for the rows) keeps fp32 sums
    if kernel is not w4a16_gemv and not (kernel is w4a16_matmul and rows <= GEMV_MAX_M):
        # a 16-bit GEMM on the rounded weight (CPU: 16-bit partial sums): the output's scale
        tol["atol"] *= ref.float().abs().max().item()
    if x.dtype == torch.float32:  # fp32 sums of terms up to ~1000x the result (the groups'
        # scales differ by 1000x) round at the terms' scale, in another order than torch's
        w = reference.int4_dequantize(*weights, group_size, x.shape[-1]).double()
        terms = F.linear(x.double().abs(), w.abs())
        exact = F.linear(x.double(), w) + (0.0 if bias is None else bias.double())
        bound = tol["atol"] + tol["rtol"] * exact.abs() + 8 * 2.0**-24 * terms
        err = (out.double() - exact).abs()
        assert (err <= bound).all(), f"max error {err.max().item():.3g}, bound there " + (
            f"{bound.flatten()[err.argmax()].item():.3g}"
        )
        return out
    torch.testing.assert_close(out.float(), ref.float(), **tol)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "m,n,k,group_size",
    [(1, 96, 256, 128), (2, 40, 200, 64), (5, 64, 200, 128), (8, 80, 300, 64), (3, 40, 96, 32),
     (19, 80, 300, 64), (80, 72, 384, 128)],
    ids=["one-row", "two-rows", "short-group", "K%8", "group32", "19-rows-K%8", "dequantized"],
)  # fmt: skip
@pytest.mark.parametrize("with_bias", [False, True], ids=["", "bias"])
def test_w4a16_matches_reference(device, dtype, m, n, k, group_size, with_bias) -> None:
    """Default configs: K not a multiple of the tile (200, 300), of a word (300 = 37.5 words),
    several groups per row; M up to GEMV_MAX_M (the GEMV), up to MMA_MAX_M (the tensor-core
    kernel) and above (dequantized, cuBLAS)."""
    weights = make_int4(n, k, group_size, device)
    x = torch.randn(m, k, device=device).to(dtype)
    bias = torch.randn(n, device=device).to(dtype) if with_bias else None
    check(x, weights, group_size, bias)


@pytest.mark.parametrize("split_k", [1, 2, 3, 6])
@pytest.mark.parametrize("m,block_m", [(1, 1), (2, 2), (3, 4)])
def test_gemv_split_k_and_ragged_tiles(device, split_k: int, m: int, block_m: int) -> None:
    """The GEMV: K split unevenly across programs (the last split short, or empty and
    dropped), N not a multiple of its tile, rows padded (3 of 4), K tiles smaller than a
    group."""
    weights = make_int4(72, 300, 64, device)
    x = torch.randn(m, 300, device=device)
    bias = torch.randn(72, device=device)
    check(x, weights, 64, bias, W4A16Config(block_m, 32, 32, split_k=split_k), w4a16_gemv)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("split_k", [1, 3, 6])
@pytest.mark.parametrize("m", [1, 2])
def test_gemv_16_bit_pairs_split_k_and_ragged_k(device, dtype, split_k: int, m: int) -> None:
    """The GEMV's 16-bit path (nibbles i and i + 4 of a word as 128 + q): a partial last word
    (300 = 37.5 words: its nibbles 4-7 meet no x; at 2 rows the next row's inputs lie there),
    K split unevenly, N ragged, K tiles smaller than a group."""
    weights = make_int4(72, 300, 64, device)
    x = torch.randn(m, 300, device=device).to(dtype)
    bias = torch.randn(72, device=device).to(dtype)
    check(x, weights, 64, bias, W4A16Config(m, 32, 32, split_k=split_k), w4a16_gemv)


@pytest.mark.parametrize("split_k", [1, 2, 3, 6])
@pytest.mark.parametrize("group_size", [128, 64])
@pytest.mark.parametrize("m", [7, 19, 40])
def test_mma_split_k_and_ragged_tiles(device, split_k: int, group_size: int, m: int) -> None:
    """The tensor-core kernel: K (300: a partial last tile and word) split unevenly across
    programs, N not a multiple of its tile, rows padded (7 of 16) and over several row tiles
    (19, 40); a K tile in one group (128: the scale after the dots) or over two (64: the
    weights scaled first)."""
    weights = make_int4(72, 300, group_size, device)
    x = torch.randn(m, 300, device=device)
    bias = torch.randn(72, device=device)
    config = W4A16Config(16, 32, MMA_BLOCK_K, split_k=split_k)
    check(x, weights, group_size, bias, config, w4a16_mma)
    assert not split_counters(device, 1).any(), "a split tile's counter was left set"


@pytest.mark.parametrize("k", [256, 300], ids=["even", "ragged"])
def test_mma_weight_loads_stay_in_the_weight(device, monkeypatch, k: int) -> None:
    """Every weight word the tensor-core kernel loads (mask on) lies in qweight's [N, K / 8]:
    with K a multiple of the tile (EVEN_K, no mask along the words) and without, K split
    across programs, N ragged. The weight is a view into a larger buffer, whose extra rows
    and words numbers alone would not reveal (x is zero past K, rows past N are not
    stored): the interpreter's loads are watched instead."""
    if device.type != "cpu":
        pytest.skip("watches the interpreter's loads")
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    addresses = []
    load = interpreter.InterpreterBuilder.create_masked_load

    def watched(self, ptrs, mask, *args):
        if ptrs.get_element_ty() == tl.int32:  # the kernel's only int32 loads: the words
            addresses.append(np.asarray(ptrs.data)[np.asarray(mask.data).astype(bool)])
        return load(self, ptrs, mask, *args)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", watched)
    n = 72
    q, scale, zero = make_int4(n, k, 128, device)
    words = q.shape[1]
    buffer = torch.full((n + 56, words + 16), -1, dtype=torch.int32, device=device)
    buffer[:n, :words] = q
    for m, block_m, block_n, split in [(3, 16, 64, 2), (40, 32, 128, 3), (19, 16, 32, 5)]:
        addresses.clear()
        x = torch.randn(m, k, device=device)
        config = W4A16Config(block_m, block_n, MMA_BLOCK_K, split)
        check(x, (buffer[:n, :words], scale, zero), 128, None, config, w4a16_mma)
        at = (np.concatenate(addresses).astype(np.int64) - buffer.data_ptr()) // 4
        rows, cols = at // buffer.stride(0), at % buffer.stride(0)
        assert rows.min() >= 0 and rows.max() < n and cols.max() < words, (config, rows, cols)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "k,group_size",
    [(300, 16), (300, 48), (400, 80), (304, 304), (1000, 384), (300, 256)],
    ids=["16", "48", "80", "channel-304", "384", "256-short"],
)
def test_mma_group_sizes(device, dtype, k: int, group_size: int) -> None:
    """Groups the checkpoints allow (any multiple of 16) beside 64 / 128: several a K tile,
    not a power of 2 (48, 80: a tile starts inside a group), one a row of K not a multiple
    of the tile (304: the weights scaled first), whole tiles but not a power of 2 (384, K
    1000: the short last group), larger than K's last tile (256 of 300); K split, with
    several row tiles."""
    weights = make_int4(40, k, group_size, device)
    x = torch.randn(19, k, device=device).to(dtype)
    bias = torch.randn(40, device=device).to(dtype)
    check(x, weights, group_size, bias, W4A16Config(16, 32, MMA_BLOCK_K, split_k=3), w4a16_mma)


@pytest.mark.parametrize("m", [2, 5])
def test_w4a16_strided_rows_are_the_contiguous_rows(device, m: int) -> None:
    """Rows of a wider tensor, every other input, and a permuted 3-D batch (the GEMV and the
    tensor-core kernel): the same output, bit for bit, as their copy."""
    weights = make_int4(40, 200, 64, device)
    wide = torch.randn(m, 400, device=device).bfloat16()
    for x in (wide[:, :200], wide[:, ::2], wide.view(m, 2, 200).transpose(0, 1)):
        assert not x.is_contiguous()
        want = w4a16_matmul(x.contiguous(), *weights, 64)
        assert torch.equal(w4a16_matmul(x, *weights, 64), want)
    check(wide[:, ::2], weights, 64)


@pytest.mark.parametrize("m", [3, 64, 65])
def test_w4a16_default_configs_split_k(device, m: int) -> None:
    """What ``w4a16_matmul`` picks at the tensor-core kernel's ends (3 and 64 rows: K of 8
    tiles split in 2, 16 and 64 rows a program) and past it (65: dequantized)."""
    if m <= 64:
        assert default_mma_config(m, 40, 1024, 128).split_k == 2
    weights = make_int4(40, 1024, 128, device)
    check(torch.randn(m, 1024, device=device).bfloat16(), weights, 128)
    assert not split_counters(device, 1).any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_mma_16_bit_rows_with_group_tiles(device, dtype) -> None:
    """16-bit rows on the exact path (q - zero as 16-bit integers into the dots, the scale
    on the fp32 sums): within the output dtype's rounding of the fp32 reference."""
    weights = make_int4(96, 512, 128, device)
    x = torch.randn(24, 512, device=device).to(dtype)
    out = w4a16_mma(x, *weights, 128, None, W4A16Config(16, 32, MMA_BLOCK_K, split_k=2))
    ref = reference.w4a16_linear(x, *weights, 128)
    ulp = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
    scale = ref.float().abs().max().item()
    torch.testing.assert_close(out.float(), ref.float(), atol=4 * ulp * scale, rtol=ulp)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_int4_dequantize_kernel_is_the_reference_rounded(device, dtype) -> None:
    """The prefill path's dequantized weight: the reference's fp32 values rounded once to the
    activations' dtype, with K ragged (a partial last word and group): bit for bit on a GPU
    and in fp32; under the interpreter, which truncates fp32 to 16 bits, within one ulp."""
    n, k, group_size = 72, 300, 64
    weights = make_int4(n, k, group_size, device)
    got = int4_dequantize(*weights, group_size, k, dtype)
    exact = reference.int4_dequantize(*weights, group_size, k)
    assert got.dtype == dtype and got.shape == (n, k)
    if device.type == "cuda" or dtype == torch.float32:
        assert torch.equal(got, exact.to(dtype))
    else:
        ulp = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
        torch.testing.assert_close(got.float(), exact, atol=0, rtol=ulp)


@pytest.mark.parametrize(
    "group_size,edges",
    [(64, [0, 63, 64, 127, 128, 191, 192, 199]), (128, [0, 1, 127, 128, 129, 198, 199])],
)
def test_w4a16_group_edges_are_exact_in_fp32(device, group_size, edges) -> None:
    """One input at a time (one row each: the tensor-core kernel's rows, and each alone: the
    GEMV's): the output is that input's weight column, dequantized; every column of a group
    edge (first / last of each group, the short last one) reads its own group's scale and
    zero point."""
    n, k = 40, 200
    weights = make_int4(n, k, group_size, device)
    x = torch.zeros(len(edges), k, device=device)
    x[torch.arange(len(edges)), edges] = 1.0
    columns = reference.int4_dequantize(*weights, group_size, k)[:, edges].T
    assert torch.equal(w4a16_matmul(x, *weights, group_size), columns)
    for row, want in zip(x, columns, strict=True):
        assert torch.equal(w4a16_matmul(row[None], *weights, group_size)[0], want)


def test_w4a16_leading_dims_and_empty_batch(device) -> None:
    weights = make_int4(48, 128, 128, device)
    x = torch.randn(2, 3, 128, device=device).bfloat16()
    out = check(x, weights, 128)
    assert out.shape == (2, 3, 48)
    assert w4a16_matmul(x[:0], *weights, 128).shape == (0, 3, 48)


def test_refusals_are_remembered_by_the_whole_tile(device, monkeypatch) -> None:
    """A refusal of a 16-row program of 128 channels (a 40-row default stepped down) does not
    stand for the 64-channel program that 16 rows default to: that one is still launched."""
    launched = small_card(
        monkeypatch,
        lambda c: c.block_m * c.block_n <= 16 * 64,
        lambda c: (c.block_m, c.block_n, c.num_stages),
    )  # at most 16 x 64
    weights = make_int4(256, 256, 128, device)
    with pytest.raises(RuntimeError, match="no int4 tensor-core tile"):
        w4a16_mma(torch.randn(40, 256, device=device), *weights, 128)
    launched.clear()
    x = torch.randn(8, 256, device=device)
    check(x, weights, 128, kernel=lambda x, *args: w4a16_mma(x, *args[:5]))
    assert launched == [(16, 64, 3)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("m", [3, 16, 64])
def test_gpu_mma_ptx_unpack_equals_the_float_unpack(dtype, m: int) -> None:
    """The PTX unpack (two nibbles a 32-bit op) gives the dots the same 16-bit q - zero as
    the fp32 route, so the outputs are equal, bit for bit (K split, a partial tile)."""
    weights = make_int4(6144, 4000, 128, torch.device("cuda"))
    x = torch.randn(m, 4000, device="cuda").to(dtype)
    ptx = w4a16_mma(x, *weights, 128, magic=True)
    assert torch.equal(ptx, w4a16_mma(x, *weights, 128, magic=False))
    assert not ptx.isnan().any()


# ---- GPU: Llama-3-8B shapes ------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 16, 64, 256, 4096])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)],
                         ids=["qkv", "o", "gate_up", "down"])  # fmt: skip
def test_gpu_w4a16_llama8b_shapes(m: int, n: int, k: int) -> None:
    """bf16 activations: the kernel's output vs the reference's within bf16 rounding, as a
    relative (Frobenius) error and elementwise."""
    weights = make_int4(n, k, 128, torch.device("cuda"))
    x = torch.randn(m, k, device="cuda").bfloat16()
    out = w4a16_matmul(x, *weights, 128)
    ref = reference.w4a16_linear(x, *weights, 128)
    assert float((out.float() - ref.float()).norm() / ref.float().norm()) < 4e-3
    torch.testing.assert_close(out.float(), ref.float(), atol=0.02 * ref.float().abs().max().item(),
                               rtol=1.6e-2)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("group_size", [32, 64, 1024, -1], ids=["32", "64", "1024", "row"])
@pytest.mark.parametrize("m", [3, 40])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336)], ids=["qkv", "down"])
def test_gpu_w4a16_mma_group_sizes(dtype, group_size: int, m: int, n: int, k: int) -> None:
    """The tensor-core kernel at 8B shapes with the other groups checkpoints use (32, 64:
    weights scaled before the dots; 1024 and one a row: a scale on the sums), 16-bit rows
    within the output's rounding (fp32 runs in the int4 engines' GPU tests)."""
    group_size = k if group_size == -1 else group_size
    weights = make_int4(n, k, group_size, torch.device("cuda"))
    x = torch.randn(m, k, device="cuda").to(dtype)
    check(x, weights, group_size, torch.randn(n, device="cuda").to(dtype))
