"""The one-row GEMV with 16-bit weights and its fusions (RMSNorm prologue, residual add,
SiLU-and-mul) vs the torch reference and vs the unfused kernels."""

import pytest
import torch
from kernel_testing import TOL, ULP

from kernels import reference
from kernels.activation import silu_and_mul
from kernels.gemv import GemvTiles, linear_one_row
from kernels.rms_norm import rms_norm

HALF = (torch.bfloat16, torch.float16)
HALF_IDS = ["bf16", "fp16"]
EPS = 1e-5
# The kernel and the reference accumulate in fp32 in different orders, then round to the
# dtype up to four times (normed input, gate, up, SiLU, each an ulp off when the fp32 value
# sits near a rounding boundary; Triton's interpreter truncates instead of rounding).
FUSED_TOL = {dt: {"atol": TOL[dt]["atol"], "rtol": 4 * ULP[dt]} for dt in HALF}


def assert_fused_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """FUSED_TOL, the absolute part scaled by the largest output: a residual can cancel the
    product, whose errors are what the tolerance bounds."""
    rtol = FUSED_TOL[ref.dtype]["rtol"]
    ref, out = ref.float(), out.float()
    torch.testing.assert_close(out, ref, rtol=rtol, atol=rtol * ref.abs().max().item())


def make(n: int, k: int, dtype: torch.dtype, device: torch.device, gated: bool = False):
    rows = 2 * n if gated else n
    w = (torch.randn(rows, k, device=device) * k**-0.5).to(dtype)
    x = torch.randn(1, k, device=device).to(dtype)
    return x, w


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize(
    "n,k,tiles",
    [(64, 256, GemvTiles(16, 128)), (72, 300, GemvTiles(16, 64)), (40, 96, GemvTiles(8, 32, 2, 0)),
     (48, 512, GemvTiles(4, 64, 4, 1)), (24, 1024, None), (4, 8192, None)],
    ids=["whole-tiles", "ragged", "prefetch0", "prefetch1", "default", "default-long-k"],
)  # fmt: skip
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["", "bias"])
def test_gemv_matches_reference(device, dtype, n, k, tiles, gated, with_bias) -> None:
    x, w = make(n, k, dtype, device, gated)
    bias = torch.randn(w.shape[0], device=device).to(dtype) if with_bias else None
    out = linear_one_row(x, w, bias, gated=gated, tiles=tiles)
    assert out.shape == (1, n) and out.dtype == dtype
    assert not out.isnan().any(), "kernel left unwritten elements"
    torch.testing.assert_close(
        out.float(), reference.linear_one_row(x, w, bias, gated=gated).float(), **FUSED_TOL[dtype]
    )


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("n,k,tiles", [(64, 256, GemvTiles(16, 128)), (72, 300, GemvTiles(8, 64))],
                         ids=["whole-tiles", "ragged"])  # fmt: skip
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_gemv_norm_and_residual_match_reference(device, dtype, n, k, tiles, gated) -> None:
    x, w = make(n, k, dtype, device, gated)
    x = x * 3 + 1  # an RMS far from 1, so a missing normalisation shows
    g = (torch.rand(k, device=device) + 0.5).to(dtype)
    r = torch.randn(1, n, device=device).to(dtype)
    kw = {"gated": gated, "norm": (g, EPS), "residual": r}
    assert_fused_close(
        linear_one_row(x, w, tiles=tiles, **kw), reference.linear_one_row(x, w, **kw)
    )


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_fusions_round_as_the_unfused_kernels(device: torch.device, dtype: torch.dtype) -> None:
    """Each fusion equals the GEMV followed (or preceded) by the kernel it replaces: the
    residual add and SiLU-and-mul bit for bit; the norm within rounding (the fused one
    keeps the normed input in fp32, the RMSNorm kernel rounds it to the dtype)."""
    n, k, tiles = 48, 320, GemvTiles(8, 64)
    x, w = make(n, k, dtype, device, gated=True)
    r = torch.randn(1, n, device=device).to(dtype)
    plain = linear_one_row(x, w[:n], tiles=tiles)
    with_res = linear_one_row(x, w[:n], residual=r, tiles=tiles)
    _, added = rms_norm(plain, torch.ones(n, device=device, dtype=dtype), EPS, residual=r)
    assert torch.equal(with_res, added)  # the add the norm kernel did before
    both = linear_one_row(x, w, tiles=tiles)
    assert torch.equal(linear_one_row(x, w, gated=True, tiles=tiles), silu_and_mul(both))
    g = (torch.rand(k, device=device) + 0.5).to(dtype)
    normed, _ = rms_norm(x, g, EPS)
    fused = linear_one_row(x, w[:n], norm=(g, EPS), tiles=tiles)
    unfused = linear_one_row(normed, w[:n], tiles=tiles)
    torch.testing.assert_close(fused.float(), unfused.float(), **FUSED_TOL[dtype])
    buf = torch.full((3, n), float("nan"), device=device, dtype=dtype)  # ``out``: a row of it
    assert linear_one_row(x, w[:n], out=buf[1:2], tiles=tiles).data_ptr() == buf[1].data_ptr()
    assert torch.equal(buf[1:2], plain) and buf[0].isnan().all() and buf[2].isnan().all()


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_gemv_reads_rows_at_the_weight_stride(device: torch.device, gated: bool) -> None:
    """A column slice of a wider weight (rows padded by 8: ``gemv_layout`` takes any row
    stride that is a multiple of 4) is read at its own stride, its up rows too; 16- and
    8-bit weights alike."""
    from kernels.quant_matmul import W8A16Config, w8a16_matmul
    from vllm_runner.model.layers.quant import quantize_int8

    n, k, tiles = 24, 128, GemvTiles(8, 64)
    rows = 2 * n if gated else n
    x = torch.randn(1, k, device=device).bfloat16()
    w = (torch.randn(rows, k + 8, device=device) * k**-0.5).bfloat16()[:, :k]
    out = linear_one_row(x, w, gated=gated, tiles=tiles)
    assert torch.equal(out, linear_one_row(x, w.contiguous(), gated=gated, tiles=tiles))
    q, scale = quantize_int8(torch.randn(rows, k + 16, device=device) * 0.05)
    cfg = W8A16Config(1, 8, 64, num_stages=1)
    out = w8a16_matmul(x, q[:, :k], scale, config=cfg, gated=gated)
    assert torch.equal(out, w8a16_matmul(x, q[:, :k].contiguous(), scale, config=cfg, gated=gated))


def test_gemv_writes_only_its_row_of_out(device: torch.device) -> None:
    """N ragged against block_n (44 = 5 x 8 + 4), the weight the first N rows of a larger
    one and ``out`` a row of a larger buffer: nothing past the N outputs is written."""
    n, k, tiles = 44, 128, GemvTiles(8, 64)
    x, w = make(n + 4, k, torch.bfloat16, device)
    w = w[:n]
    buf = torch.full((3, n), -7.0, device=device, dtype=torch.bfloat16)
    linear_one_row(x, w, out=buf[1:2], tiles=tiles)
    assert (buf[0] == -7).all() and (buf[2] == -7).all()
    assert_fused_close(buf[1:2], reference.linear_one_row(x, w))


def test_gemv_norm_adds_eps(device: torch.device) -> None:
    """An input whose mean square (~1e-6) is below eps: eps, not the input, sets the scale
    of the normed row (a missing eps scales it up ~3x)."""
    n, k = 16, 128
    x, w = make(n, k, torch.bfloat16, device)
    x = x * 1e-3
    g = (torch.rand(k, device=device) + 0.5).bfloat16()
    kw = {"norm": (g, EPS)}
    out = linear_one_row(x, w, tiles=GemvTiles(8, 64), **kw)
    assert_fused_close(out, reference.linear_one_row(x, w, **kw))


def test_gemv_rejects_bad_inputs(device: torch.device) -> None:
    x, w = make(32, 64, torch.bfloat16, device)
    with pytest.raises(AssertionError, match=r"x \(2, 64\) must be \(1, 64\)"):
        linear_one_row(torch.cat([x, x]), w)
    with pytest.raises(AssertionError, match="vs weight"):
        linear_one_row(x.half(), w)
    with pytest.raises(AssertionError, match="K % 4 == 0"):
        linear_one_row(x[:, :62], w[:, :62])
    with pytest.raises(AssertionError, match=r"norm weight .* must be torch.bfloat16 \(64,\)"):
        linear_one_row(x, w, norm=(torch.ones(32, device=device, dtype=torch.bfloat16), EPS))
    with pytest.raises(AssertionError, match=r"residual .* must be torch.bfloat16 \(1, 32\)"):
        linear_one_row(x, w, residual=torch.zeros(1, 64, device=device, dtype=torch.bfloat16))
    with pytest.raises(AssertionError, match=r"out torch.float16 \(1, 32\) must be a contig"):
        linear_one_row(x, w, out=torch.empty(1, 32, device=device, dtype=torch.float16))
    with pytest.raises(AssertionError, match="block_k 6 must be a power of 2"):
        GemvTiles(4, 6)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "n,k,gated",
    [(3072, 2048, False), (2048, 2048, False), (8192, 2048, True), (2048, 8192, False),
     (6144, 4096, False), (14336, 4096, True), (4096, 14336, False)],
)  # fmt: skip
def test_gemv_llama_shapes(device: torch.device, n: int, k: int, gated: bool) -> None:
    """The Llama-3.2-1B and Llama-3-8B projections at batch 1, with the fusions the decode
    layer uses (norm before qkv / gate_up, residual after o / down)."""
    x, w = make(n, k, torch.bfloat16, device, gated)
    g = (torch.rand(k, device=device) + 0.5).bfloat16()
    r = torch.randn(1, n, device=device).bfloat16()
    kw = {"gated": gated, "norm": (g, EPS)} if gated or n > k else {"residual": r}
    assert_fused_close(linear_one_row(x, w, **kw), reference.linear_one_row(x, w, **kw))


@pytest.mark.parametrize("wdtype", ["int8", "fp8"])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_w8_gemv_fusions_match_reference(device: torch.device, wdtype: str, gated: bool) -> None:
    """int8 / fp8 weights (W8A16) on the same GEMV take the decode layer's fusions too."""
    from kernels.quant_matmul import W8A16Config, w8a16_matmul
    from vllm_runner.model.layers.quant import quantize_fp8_rows, quantize_int8

    n, k = 40, 320
    quantize = quantize_int8 if wdtype == "int8" else quantize_fp8_rows
    q, scale = quantize(torch.randn(2 * n if gated else n, k, device=device) * k**-0.5)
    x = (torch.randn(1, k, device=device) * 3 + 1).bfloat16()
    g = (torch.rand(k, device=device) + 0.5).bfloat16()
    r = torch.randn(1, n, device=device).bfloat16()
    kw = {"gated": gated, "norm": (g, EPS), "residual": r}
    cfg = W8A16Config(1, 8, 64, num_warps=2, num_stages=1, prefetch=2)
    out = w8a16_matmul(x, q, scale, config=cfg, **kw)
    assert_fused_close(out, reference.linear_one_row(x, q.float() * scale[:, None], **kw))
    with pytest.raises(AssertionError, match="fuse into the one-row GEMV only"):
        w8a16_matmul(torch.cat([x, x]), q, scale, residual=r)
    with pytest.raises(AssertionError, match="fuse into the one-row GEMV only"):  # was dropped
        w8a16_matmul(torch.cat([x, x]), q, scale, gated=gated, norm=(g, EPS))
    tiled = W8A16Config(16, 16, 32)
    with pytest.raises(AssertionError, match="fuse into the one-row GEMV only"):
        w8a16_matmul(x, q, scale, config=tiled, **kw)


def test_long_gated_rows_take_the_norm_kernel_first(device: torch.device) -> None:
    """Gated layers with K >= 4096 run the RMSNorm kernel before the GEMV (the normed input
    rounds to the dtype there): the result equals that composition exactly."""
    from kernels.gemv import norm_in_kernel

    assert norm_in_kernel(4096, gated=False) and norm_in_kernel(2048, gated=True)
    assert not norm_in_kernel(4096, gated=True)
    n, k, tiles = 8, 4096, GemvTiles(4, 512)
    x, w = make(n, k, torch.bfloat16, device, gated=True)
    g = (torch.rand(k, device=device) + 0.5).bfloat16()
    fused = linear_one_row(x, w, gated=True, norm=(g, EPS), tiles=tiles)
    assert torch.equal(fused, linear_one_row(rms_norm(x, g, EPS)[0], w, gated=True, tiles=tiles))


def test_unaligned_norm_weight_takes_plain_loads(device: torch.device) -> None:
    """A norm weight at an address that is not 8-byte aligned (a view into a buffer) is
    read element by element, like an unaligned x: same result as an aligned copy."""
    n, k, tiles = 24, 256, GemvTiles(8, 64)
    x, w = make(n, k, torch.bfloat16, device)
    buffer = (torch.rand(k + 1, device=device) + 0.5).bfloat16()
    g = buffer[1:]  # 2 bytes past an aligned allocation
    assert g.data_ptr() % 8
    out = linear_one_row(x, w, norm=(g, EPS), tiles=tiles)
    assert torch.equal(out, linear_one_row(x, w, norm=(g.clone(), EPS), tiles=tiles))


def test_bad_w8a16_configs_name_themselves() -> None:
    from kernels.quant_matmul import W8A16Config

    with pytest.raises(AssertionError, match="block_n 0 must be a power of 2"):
        W8A16Config(16, 0, 32)
    with pytest.raises(AssertionError, match="block_k 2 must be >= 4 for the GEMV"):
        W8A16Config(1, 4, 2)
    with pytest.raises(AssertionError, match="split_k 0 must be >= 1"):
        W8A16Config(16, 16, 32, split_k=0)
