"""The one-row int4 GEMV in packed half precision (inline PTX: GPU only) vs the reference,
and what one row takes in ``w4a16_matmul``."""

import pytest
import torch
import torch.nn.functional as F
from kernel_testing import make_int4

from kernels import reference
from kernels.int4_words import W4A16Config
from kernels.quant_int4 import w4a16_gemv, w4a16_matmul
from kernels.quant_int4_half2 import w4a16_gemv_half2
from vllm_runner.model.layers.int4 import quantize_int4

pytestmark = pytest.mark.gpu
DTYPES = [torch.float16, torch.bfloat16]
IDS = ["fp16", "bf16"]


def check_half2(x, weights, group_size, bias=None, config=None) -> torch.Tensor:
    """Within fp16's rounding of the products' magnitudes (2**-10 of sum |w x|) plus the
    output dtype's rounding of the result, against the product in fp64."""
    out = w4a16_gemv_half2(x, *weights, group_size, bias, config)
    assert out.dtype == x.dtype and out.shape == (1, weights[0].shape[0])
    w = reference.int4_dequantize(*weights, group_size, x.shape[-1]).double()
    exact = F.linear(x.double(), w) + (0.0 if bias is None else bias.double())
    terms = F.linear(x.double().abs(), w.abs())
    rounding = 2.0**-8 if x.dtype == torch.bfloat16 else 2.0**-11
    # (the output's rounding: half its spacing, fp16's subnormal spacing near zero)
    bound = 2.0**-10 * terms + rounding * (exact.abs() + torch.finfo(x.dtype).tiny)
    err = (out.double() - exact).abs()
    assert torch.isfinite(out).all()
    assert (err <= bound).all(), (
        f"max error {err.max().item():.3g} where the bound is "
        f"{bound.flatten()[err.argmax()].item():.3g}"
    )
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)],
                         ids=["qkv", "o", "gate_up", "down"])  # fmt: skip
def test_half2_llama8b_shapes(dtype, n: int, k: int) -> None:
    weights = make_int4(n, k, 128, torch.device("cuda"))
    x = torch.randn(1, k, device="cuda").to(dtype)
    out = check_half2(x, weights, 128)
    fp32_gemv = w4a16_gemv(x, *weights, 128).float()  # same sums, fp32 products
    assert float((out.float() - fp32_gemv).norm() / fp32_gemv.norm()) < 4e-3


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize(
    "n,k,group_size", [(96, 256, 128), (40, 1000, 128), (40, 1004, 128), (72, 4000, 128),
                       (64, 1152, 1152), (80, 1536, 256), (33, 8192, 128)],
    ids=["short-K", "K%128", "K%8", "K%512", "channelwise", "group256", "K-max"],
)  # fmt: skip
@pytest.mark.parametrize("with_bias", [False, True], ids=["", "bias"])
def test_half2_ragged_k_groups_and_bias(dtype, n: int, k: int, group_size: int,
                                        with_bias: bool) -> None:  # fmt: skip
    weights = make_int4(n, k, group_size, torch.device("cuda"))
    x = torch.randn(1, k, device="cuda").to(dtype)
    bias = torch.randn(n, device="cuda").to(dtype) if with_bias else None
    check_half2(x, weights, group_size, bias)


@pytest.mark.parametrize("split_k", [1, 3, 8])
@pytest.mark.parametrize("block_n,block_k", [(4, 1024), (16, 128), (64, 256)])
def test_half2_split_k_and_tiles(split_k: int, block_n: int, block_k: int) -> None:
    weights = make_int4(200, 3200, 128, torch.device("cuda"))
    x = torch.randn(1, 3200, device="cuda").bfloat16()
    check_half2(x, weights, 128, config=W4A16Config(1, block_n, block_k, split_k, num_warps=2))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("magnitude", [1e-6, 1.0, 300.0], ids=["tiny", "unit", "large"])
def test_half2_scales_x_out_of_fp16_trouble(dtype, magnitude: float) -> None:
    """Activations far from 1, with outliers 100x the rest (x up to 3e4, where unscaled fp16
    products (q - zero) x of up to 15 x would overflow), neither overflow nor lose precision:
    each split scales its x by a power of two. (Weights of one scale, so that the outputs
    stay within fp16's range.)"""
    weights = quantize_int4(torch.randn(256, 2048, device="cuda") * 0.01, 128)
    x = torch.randn(1, 2048, device="cuda") * magnitude
    x[0, ::97] *= 100.0
    check_half2(x.clamp(-6e4, 6e4).to(dtype), weights, 128)


def test_one_row_takes_half2_where_it_applies() -> None:
    """16-bit x and groups of multiples of 128: the half2 GEMV (any K); groups of 64: the
    fp32 GEMV (equal outputs, bit for bit, to the kernel called)."""
    dev = torch.device("cuda")
    for k, group, half2 in [(1024, 128, True), (1024, 64, False), (14336, 128, True)]:
        weights = make_int4(256, k, group, dev)
        x = torch.randn(1, k, device="cuda").bfloat16()
        expected = (w4a16_gemv_half2 if half2 else w4a16_gemv)(x, *weights, group)
        assert torch.equal(w4a16_matmul(x, *weights, group), expected), (k, group)
