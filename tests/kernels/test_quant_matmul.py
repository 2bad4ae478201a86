"""W8A16 int8 matmul kernel and fp8 per-token quantization kernel vs their torch references."""

import pytest
import torch
from kernel_testing import DTYPE_IDS, DTYPES

from kernels import reference
from kernels.quant_matmul import W8A16Config, default_config, fp8_quantize_rows, w8a16_matmul
from vllm_runner.model.layers.quant import quantize_fp8_rows, quantize_int8

# The kernel and the reference both accumulate in fp32 and round once; what differs is the
# summation order (and tf32-free bf16/fp16 products on tensor cores), so the output dtype's
# rounding dominates.
TOL = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 1.6e-2, "rtol": 1.6e-2},
}


def make_int8(n: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(n, k, device=device) * 0.05
    return quantize_int8(w)


def check(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias, config=None) -> None:
    out = w8a16_matmul(x, q, scale, bias, config)
    ref = reference.w8a16_linear(x, q, scale, bias)
    assert out.dtype == x.dtype and out.shape == ref.shape
    assert not out.isnan().any(), "kernel left unwritten elements"
    torch.testing.assert_close(out.float(), ref.float(), **TOL[x.dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("m,n,k", [(1, 96, 160), (5, 64, 64), (37, 80, 200)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_w8a16_matches_reference(
    device: torch.device, dtype: torch.dtype, m: int, n: int, k: int, with_bias: bool
) -> None:
    q, scale = make_int8(n, k, device)
    x = torch.randn(m, k, device=device).to(dtype)
    bias = torch.randn(n, device=device).to(dtype) if with_bias else None
    check(x, q, scale, bias)


@pytest.mark.parametrize("split_k", [1, 2, 3])
def test_w8a16_split_k_and_ragged_tiles(device: torch.device, split_k: int) -> None:
    """K not a multiple of the K tile, N and M not multiples of theirs, K split unevenly."""
    q, scale = make_int8(72, 300, device)
    x = torch.randn(19, 300, device=device)
    bias = torch.randn(72, device=device)
    check(x, q, scale, bias, W8A16Config(16, 32, 64, split_k=split_k, num_stages=1))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,k,block_n,block_k", [(64, 256, 16, 128), (72, 300, 16, 64)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_w8_gemv_one_row(device, dtype, n: int, k: int, block_n, block_k, with_bias) -> None:
    """The single-row GEMV config (block_m 1): whole tiles (no masks) and ragged N and K."""
    q, scale = make_int8(n, k, device)
    x = torch.randn(1, k, device=device).to(dtype)
    bias = torch.randn(n, device=device).to(dtype) if with_bias else None
    check(x, q, scale, bias, W8A16Config(1, block_n, block_k, num_stages=1))


@pytest.mark.parametrize("config", [W8A16Config(1, 16, 64, num_stages=1),
                                    W8A16Config(16, 32, 64, split_k=2, num_stages=1)],
                         ids=["gemv", "tiled"])  # fmt: skip
def test_fp8_weights_ragged_tiles(device: torch.device, config: W8A16Config) -> None:
    """e4m3 weights through both kernels' masked paths (ragged N and K), widened exactly."""
    q, scale = quantize_fp8_rows(torch.randn(72, 300, device=device) * 0.05)
    x = torch.randn(1 if config.block_m == 1 else 19, 300, device=device).bfloat16()
    check(x, q, scale, torch.randn(72, device=device).bfloat16(), config)


def check_gated(x, q, scale, bias, config=None) -> None:
    """The fused SiLU-and-mul epilogue vs the unfused reference (matmul, then activation).
    Both round gate and up to x.dtype before the product: one differently rounded factor
    (summation order) moves the result by up to ~2 ulps, hence twice the matmul tolerance."""
    out = w8a16_matmul(x, q, scale, bias, config, gated=True)
    ref = reference.silu_and_mul(reference.w8a16_linear(x, q, scale, bias))
    assert out.dtype == x.dtype and out.shape == ref.shape
    assert not out.isnan().any(), "kernel left unwritten elements"
    tol = {key: 2 * value for key, value in TOL[x.dtype].items()}
    torch.testing.assert_close(out.float(), ref.float(), **tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("config", [None, W8A16Config(1, 8, 64, num_stages=1),
                                    W8A16Config(16, 16, 64, num_stages=1)],
                         ids=["default", "gemv", "tiled"])  # fmt: skip
@pytest.mark.parametrize("with_bias", [False, True])
def test_w8a16_gated_matches_unfused(device, dtype, config, with_bias) -> None:
    """gated=True on a [gate; up] weight: ragged N (36 = 2 tiles + 4) and K (300)."""
    m = 1 if config is None or config.block_m == 1 else 19
    q, scale = make_int8(72, 300, device)
    x = torch.randn(m, 300, device=device).to(dtype)
    bias = torch.randn(72, device=device).to(dtype) if with_bias else None
    check_gated(x, q, scale, bias, config)


def test_w8a16_gated_fp8_weights_and_split_k(device: torch.device) -> None:
    """e4m3 weights, whole tiles; a K split falls back to matmul + activation (same result)."""
    q, scale = quantize_fp8_rows(torch.randn(64, 256, device=device) * 0.05)
    x = torch.randn(1, 256, device=device).bfloat16()
    check_gated(x, q, scale, None, W8A16Config(1, 4, 128, num_stages=1))
    check_gated(x.expand(5, 256), q, scale, None, W8A16Config(16, 16, 64, split_k=2))
    with pytest.raises(AssertionError, match="gated"):
        w8a16_matmul(x, q[:63], scale[:63], gated=True)


def _every_value_reads_back(q: torch.Tensor, config: W8A16Config) -> None:
    """One-hot rows of x read columns of q back through the kernel with unit scales: exact
    (|int8| <= 128 and e4m3's 3 mantissa bits fit bf16), whatever the widening."""
    n, k = q.shape
    scale = torch.ones(n, device=q.device)
    for j in (0, 1, 2, 3, k - 1):
        x = torch.zeros(1 if config.block_m == 1 else 3, k, device=q.device, dtype=torch.bfloat16)
        x[:, j] = 1.0
        out = w8a16_matmul(x, q, scale, config=config)
        assert torch.equal(out[0].float(), q[:, j].float()), f"column {j}"


def _value_grid(n: int, k: int, values: torch.Tensor) -> torch.Tensor:
    """[n, k]: column c holds n consecutive entries of ``values`` (cyclic), from 7 c on."""
    rows, cols = torch.arange(n)[:, None], torch.arange(k)[None, :]
    return values[(rows + 7 * cols) % len(values)]


@pytest.mark.parametrize("n,k,config", [(256, 256, W8A16Config(1, 4, 128, num_stages=1)),
                                        (250, 200, W8A16Config(1, 16, 64, num_stages=1)),
                                        (256, 256, W8A16Config(16, 32, 64, num_stages=1))],
                         ids=["gemv", "gemv-ragged", "tiled"])  # fmt: skip
def test_every_int8_value_widens_exactly(device: torch.device, n: int, k: int, config) -> None:
    """Every value in [-128, 127] in each column: on a GPU the byte-permute widening, in the
    interpreter a plain cast."""
    values = torch.arange(-128, 128).to(torch.int8)
    _every_value_reads_back(_value_grid(n, k, values).to(device), config)


@pytest.mark.parametrize("n,k,config", [(254, 256, W8A16Config(1, 4, 128, num_stages=1)),
                                        (250, 200, W8A16Config(1, 16, 64, num_stages=1)),
                                        (254, 256, W8A16Config(16, 32, 64, num_stages=1))],
                         ids=["gemv", "gemv-ragged", "tiled"])  # fmt: skip
def test_every_e4m3_value_widens_exactly(device: torch.device, n: int, k: int, config) -> None:
    """Every finite e4m3 byte (all but the two NaNs) in each column: on a GPU the GEMV's
    widening (bytes 0-1 by the conversion unit, 2-3 by integer ops), the tiled kernel's
    conversion."""
    finite = torch.tensor([b for b in range(256) if b not in (0x7F, 0xFF)], dtype=torch.uint8)
    q = _value_grid(n, k, finite).view(torch.float8_e4m3fn)
    _every_value_reads_back(q.to(device), config)


@pytest.mark.parametrize("prefetch", [0, 1, 2])
@pytest.mark.parametrize("gated", [False, True])
def test_w8_gemv_prefetch_depths(device: torch.device, prefetch: int, gated: bool) -> None:
    """Every software-pipeline depth, with fewer K tiles than the depth (K = 1 and 2 tiles:
    the prefetches clamp to the last tile) and with many, ragged."""
    for k in (64, 128, 300, 1000):
        q, scale = make_int8(72, k, device)
        x = torch.randn(1, k, device=device).bfloat16()
        cfg = W8A16Config(1, 8, 64, num_stages=1, prefetch=prefetch)
        if gated:
            check_gated(x, q, scale, None, cfg)
        else:
            check(x, q, scale, None, cfg)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_w8_gemv_unaligned_row(device: torch.device, dtype: torch.dtype) -> None:
    """A row 1 element into a buffer (not 8-byte aligned): the activations are read one by
    one instead of as packed words; same result."""
    q, scale = make_int8(64, 256, device)
    x = torch.randn(1, 257, device=device).to(dtype)[:, 1:]
    assert x.data_ptr() % 8 != 0
    check(x, q, scale, None, W8A16Config(1, 16, 128, num_stages=1))


def test_w8_gemv_needs_whole_words(device: torch.device) -> None:
    """K % 4 != 0 cannot be read as 4-byte words: the default config takes the tiled kernel
    (correct), an explicit GEMV config is refused with the reason."""
    q, scale = make_int8(64, 302, device)
    x = torch.randn(1, 302, device=device).bfloat16()
    check(x, q, scale, None)
    with pytest.raises(AssertionError, match="K % 4 == 0"):
        w8a16_matmul(x, q, scale, config=W8A16Config(1, 16, 64))


def test_w8_gemv_takes_one_row_only(device: torch.device) -> None:
    q, scale = make_int8(32, 64, device)
    with pytest.raises(AssertionError, match="one row"):
        w8a16_matmul(torch.randn(2, 64, device=device), q, scale, config=W8A16Config(1, 16, 64))
    with pytest.raises(AssertionError, match="4-byte words"):
        w8a16_matmul(torch.randn(1, 32, device=device), q.t(), scale[:1].expand(64).contiguous(),
                     config=W8A16Config(1, 16, 32))  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("split_k", [1, 2])
def test_w8a16_whole_tiles_take_the_unmasked_path(
    device: torch.device, dtype: torch.dtype, split_k: int
) -> None:
    """N and every split's K range are whole tiles (EVEN_N, EVEN_K): no masks on weights."""
    q, scale = make_int8(64, 256, device)
    x = torch.randn(3, 256, device=device).to(dtype)
    check(x, q, scale, None, W8A16Config(16, 32, 64, split_k=split_k, num_stages=1))


def test_w8a16_strided_3d_input_and_empty(device: torch.device) -> None:
    q, scale = make_int8(48, 64, device)
    base = torch.randn(2, 3, 128, device=device)
    x = base[..., :64]  # row stride 128
    out = w8a16_matmul(x, q, scale)
    assert out.shape == (2, 3, 48)
    torch.testing.assert_close(out, reference.w8a16_linear(x, q, scale), **TOL[torch.float32])
    empty = w8a16_matmul(torch.randn(0, 64, device=device), q, scale)
    assert empty.shape == (0, 48)


def test_w8a16_strided_columns(device: torch.device) -> None:
    """x with a column stride (every other element) and a transposed weight (column stride
    N: not the GEMV's layout, so the tiled kernel) are read at their own strides."""
    q, scale = make_int8(40, 96, device)
    x = torch.randn(5, 192, device=device)[:, ::2]
    q_t = q.t().contiguous().t()  # [40, 96], strides (1, 40)
    out = w8a16_matmul(x, q_t, scale)
    torch.testing.assert_close(out, reference.w8a16_linear(x, q, scale), **TOL[torch.float32])


def test_w8a16_rejects_bad_inputs(device: torch.device) -> None:
    q, scale = make_int8(16, 32, device)
    with pytest.raises(AssertionError, match="qweight"):
        w8a16_matmul(torch.randn(2, 32, device=device), q.float(), scale)
    with pytest.raises(AssertionError, match="x"):
        w8a16_matmul(torch.randn(2, 31, device=device), q, scale)
    with pytest.raises(AssertionError, match="scale"):
        w8a16_matmul(torch.randn(2, 32, device=device), q, scale.half())


@pytest.mark.parametrize(
    "m,n,k,config",
    [(2, 16, 1024, W8A16Config(16, 16, 256, 2, num_stages=4)),  # few tiles, long K: split
     (3, 8448, 32, W8A16Config(16, 32, 256, num_stages=4)),  # wide N: 32-column tiles
     (100, 40, 80, W8A16Config(64, 128, 64, num_stages=4)),
     (300, 24, 72, W8A16Config(128, 128, 64, num_warps=8)),
     (1, 4, 8192, W8A16Config(1, 2, 2048, num_stages=1))],  # the GEMV, long K
)  # fmt: skip
def test_w8a16_default_configs_match_reference(device, m, n, k, config: W8A16Config) -> None:
    """Each shape class of ``default_config`` (132 SMs off the GPU) at a tiny size, with a
    bias, in fp32."""
    assert default_config(m, n, k, 132) == config
    q, scale = make_int8(n, k, device)
    x, bias = torch.randn(m, k, device=device), torch.randn(n, device=device)
    check(x, q, scale, bias)


def test_w8a16_close_to_float_matmul(device: torch.device) -> None:
    """End to end: the int8 product stays within the quantization error of the float one
    (per-channel int8 on Gaussian weights: ~1% relative error of the output)."""
    w = torch.randn(64, 256, device=device) * 0.05
    x = torch.randn(8, 256, device=device)
    q, scale = quantize_int8(w)
    out = w8a16_matmul(x, q, scale)
    exact = x @ w.T
    rel = (out - exact).norm() / exact.norm()
    assert rel < 0.02, f"relative error {rel:.4f}"


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 100, 512])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)])
def test_w8a16_llama8b_shapes(device: torch.device, m: int, n: int, k: int) -> None:
    q, scale = make_int8(n, k, device)
    x = torch.randn(m, k, device=device).bfloat16()
    out = w8a16_matmul(x, q, scale)
    ref = reference.w8a16_linear(x, q, scale)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=1.6e-2)
    if n == 28672:  # the gate_up projection: fused SiLU-and-mul epilogue too
        gated = w8a16_matmul(x, q, scale, gated=True)
        ref = reference.silu_and_mul(ref)
        torch.testing.assert_close(gated.float(), ref.float(), atol=2e-2, rtol=1.6e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("m,k", [(1, 4096), (7, 576), (300, 14336)])
def test_fp8_quantize_rows_matches_reference(device: torch.device, dtype, m: int, k: int) -> None:
    x = (torch.randn(m, k, device=device) * 3).to(dtype)
    x[0, :7] = 0.0
    if m > 1:
        x[1] = 0.0  # an all-zero token (padding) must not divide by zero
    q, scale = fp8_quantize_rows(x)
    ref_q, ref_scale = reference.fp8_quantize_rows(x)
    torch.testing.assert_close(scale, ref_scale, rtol=1e-6, atol=0)
    # NOTE: a division result on a rounding boundary may round either way: allow one fp8 step
    # (1/8 relative in e4m3) on a tiny fraction of elements.
    diff = (q.float() - ref_q.float()).abs()
    step = ref_q.float().abs().clamp(min=2**-6) / 8
    assert (diff <= step).all()
    assert (diff > 0).float().mean() < 1e-3


@pytest.mark.parametrize(
    "m,n,k,config",
    [(1, 128 * 132, 4096, W8A16Config(1, 8, 512, num_stages=1)),  # wide N from 128 per SM
     (1, 128 * 132 - 1, 4096, W8A16Config(1, 4, 1024, num_stages=1)),
     (1, 64, 8191, W8A16Config(1, 4, 1024, num_stages=1)),
     (16, 16, 256, W8A16Config(16, 16, 256, num_stages=4)),  # one tile, one K tile: no split
     (17, 16, 256, W8A16Config(32, 16, 256, num_stages=4)),
     (32, 16, 256, W8A16Config(32, 16, 256, num_stages=4)),
     (33, 16, 256, W8A16Config(64, 16, 256, num_stages=4)),
     (64, 16, 256, W8A16Config(64, 16, 256, num_stages=4)),
     (65, 16, 256, W8A16Config(64, 128, 64, num_stages=4)),
     (256, 16, 256, W8A16Config(64, 128, 64, num_stages=4)),
     (257, 16, 256, W8A16Config(128, 128, 64, num_warps=8)),
     (2, 32 * 264 - 32, 256, W8A16Config(16, 16, 256, num_stages=4)),  # 263 column tiles of 32
     (2, 16, 65536, W8A16Config(16, 16, 256, 16, num_stages=4)),  # at most 16 splits
     (2, 16, 2048, W8A16Config(16, 16, 256, 4, num_stages=4)),  # at most half the K tiles
     (16, 16 * 132, 1024, W8A16Config(16, 16, 256, num_stages=4)),  # a tile per SM: no split
     (16, 16 * 131, 1024, W8A16Config(16, 16, 256, 2, num_stages=4))],
)  # fmt: skip
def test_default_config_boundaries(m: int, n: int, k: int, config: W8A16Config) -> None:
    """The edges of each shape class of ``default_config`` on a card of 132 SMs."""
    assert default_config(m, n, k, 132) == config


def test_w8a16_split_k_that_rounds_to_fewer_splits(device: torch.device) -> None:
    """split_k 3 of K 256 in 64-wide tiles: 2 tiles a split, so only 2 splits hold any K;
    no third split reads past the end."""
    q, scale = make_int8(32, 256, device)
    x = torch.randn(5, 256, device=device)
    check(x, q, scale, torch.randn(32, device=device), W8A16Config(16, 32, 64, split_k=3))


def test_w8a16_refuses_strided_scales_and_bad_configs(device: torch.device) -> None:
    q, scale = make_int8(16, 32, device)
    x = torch.randn(2, 32, device=device)
    with pytest.raises(AssertionError, match="scale must be contiguous"):
        w8a16_matmul(x, q, torch.stack([scale, scale], 1)[:, 0])
    with pytest.raises(AssertionError, match="prefetch 3 must be 0, 1 or 2"):
        W8A16Config(1, 4, 64, prefetch=3)
    assert W8A16Config(2, 4, 2).block_k == 2  # the tiled kernel has no word constraint


def test_fp8_quantize_rows_scales_and_empty_input(device: torch.device) -> None:
    """The per-token scales equal the reference's exactly; an all-zero token gets the minimum
    scale, not 0 (no 0 / 0), and quantizes to zeros. (The e4m3 values themselves are checked
    on a GPU only: the interpreter's fp8 cast carries mantissa overflow wrongly.)"""
    x = torch.randn(3, 40, device=device) * 3
    x[1] = 0.0
    q, scale = fp8_quantize_rows(x)
    assert torch.equal(scale, reference.fp8_quantize_rows(x)[1])
    assert scale[1].item() == torch.tensor(1e-12).item() and not q[1].float().any()
    q, scale = fp8_quantize_rows(torch.randn(0, 40, device=device))
    assert q.shape == (0, 40) and q.dtype == torch.float8_e4m3fn and scale.shape == (0,)
