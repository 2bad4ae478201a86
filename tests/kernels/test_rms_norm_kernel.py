"""Fused residual-add RMSNorm kernel vs the torch reference."""

import pytest
import torch
from kernel_testing import DTYPE_IDS, DTYPES, ROUNDING_ULPS, ULP

from kernels import reference
from kernels.rms_norm import rms_norm


def _check(actual: torch.Tensor, expected: torch.Tensor) -> None:
    rtol = ROUNDING_ULPS * ULP[expected.dtype]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert not actual.isnan().any()
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("hidden", [64, 160])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(
    device: torch.device, dtype: torch.dtype, hidden: int, with_residual: bool
) -> None:
    x = torch.randn(7, hidden, device=device).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype)
    residual = torch.randn_like(x) if with_residual else None
    x_before = x.clone()
    out, new_res = rms_norm(x, weight, 1e-6, residual)
    ref_out, ref_res = reference.rms_norm(x, weight, 1e-6, residual)
    _check(out, ref_out)
    if with_residual:
        _check(new_res, ref_res)
    else:
        assert new_res is None
    assert torch.equal(x, x_before), "inputs must not be modified"


def test_rms_norm_fp32_weight_promotes_and_strided_rows(device: torch.device) -> None:
    """bf16 activations with an fp32 weight give fp32 out (torch promotion); rows strided."""
    base = torch.randn(5, 256, device=device).bfloat16()
    x = base[:, :96]  # row stride 256
    weight = torch.randn(96, device=device)
    out, _ = rms_norm(x, weight, 1e-5)
    ref_out, _ = reference.rms_norm(x, weight, 1e-5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=ROUNDING_ULPS * 2**-7)


def test_rms_norm_3d_input(device: torch.device) -> None:
    x = torch.randn(2, 3, 64, device=device)
    residual = torch.randn_like(x)
    weight = torch.randn(64, device=device)
    out, new_res = rms_norm(x, weight, 1e-6, residual)
    ref_out, ref_res = reference.rms_norm(x, weight, 1e-6, residual)
    _check(out, ref_out)
    _check(new_res, ref_res)


@pytest.mark.parametrize("num_tokens", [1, 5])
def test_rms_norm_of_each_head_in_a_fused_qkv_row(device: torch.device, num_tokens: int) -> None:
    """Qwen3's q / k norms (LlamaAttention.norm_heads): the heads of q viewed in place in the
    fused qkv rows ([tokens, heads, head_dim], row stride q + k + v) each normed by one
    [head_dim] weight; one token's heads are a plain view, several tokens' a copy."""
    head_dim, heads, kv_heads = 32, 4, 2
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim, device=device).bfloat16()
    q = qkv[:, : heads * head_dim].unflatten(-1, (heads, head_dim))
    weight = (1 + 0.1 * torch.randn(head_dim, device=device)).bfloat16()
    before = qkv.clone()
    out, _ = rms_norm(q, weight, 1e-6)
    ref_out, _ = reference.rms_norm(q, weight, 1e-6)
    _check(out, ref_out)
    assert torch.equal(qkv, before)


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [4096, 5120, 8192])
def test_rms_norm_real_sizes(device: torch.device, hidden: int) -> None:
    x = torch.randn(1000, hidden, device=device).bfloat16()
    residual = torch.randn_like(x)
    weight = torch.randn(hidden, device=device).bfloat16()
    out, new_res = rms_norm(x, weight, 1e-5, residual)
    ref_out, ref_res = reference.rms_norm(x, weight, 1e-5, residual)
    torch.testing.assert_close(out, ref_out, atol=1e-2, rtol=2**-7)
    assert torch.equal(new_res, ref_res)


def test_rms_norm_strided_residual_and_weight_keep_their_layouts(device: torch.device) -> None:
    """A residual whose rows are strided unlike x's, and a strided weight, are read at their
    own strides; the new residual keeps x's dtype under an fp32 weight (the output promotes)."""
    x = torch.randn(5, 64, device=device).bfloat16()
    residual = torch.randn(5, 160, device=device).bfloat16()[:, 32:96]  # row stride 160
    weight = torch.randn(128, device=device)[::2]  # stride 2
    out, new_res = rms_norm(x, weight, 1e-6, residual)
    ref_out, ref_res = reference.rms_norm(x, weight.contiguous(), 1e-6, residual.contiguous())
    assert out.dtype == torch.float32 and new_res.dtype == torch.bfloat16
    _check(new_res, ref_res)  # (the interpreter truncates the bf16 sum: not bit-exact)
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=ROUNDING_ULPS * 2**-7)


def test_rms_norm_adds_eps(device: torch.device) -> None:
    """Rows whose mean square (~1e-6) is below eps: eps sets the scale of the output."""
    x = torch.randn(3, 64, device=device) * 1e-3
    weight = torch.rand(64, device=device) + 0.5
    _check(rms_norm(x, weight, 1e-5)[0], reference.rms_norm(x, weight, 1e-5)[0])


def test_rms_norm_rounds_as_the_reference(device: torch.device) -> None:
    """The residual sum is rounded to x's dtype before the norm (the fused result equals the
    norm of the stored sum, bit for bit), and the normed x before the weight multiplies it
    (with fp32 power-of-2 weights the output over the weight is a bf16 value exactly)."""
    x = torch.randn(4, 96, device=device).bfloat16()
    residual = torch.randn(4, 96, device=device).bfloat16()
    weight = (torch.rand(96, device=device) + 0.5).bfloat16()
    out, new_res = rms_norm(x, weight, 1e-6, residual)
    assert torch.equal(out, rms_norm(new_res, weight, 1e-6)[0])
    pow2 = 2.0 ** torch.randint(-2, 3, (96,), device=device).float()
    normed = rms_norm(x, pow2, 1e-6)[0] / pow2
    assert torch.equal(normed.bfloat16().float(), normed)


def test_rms_norm_broadcast_row_with_residual(device: torch.device) -> None:
    """One x row broadcast over three (row stride 0) plus three residual rows: the sums
    (and outputs) are written at their own dense strides, not x's."""
    x = torch.randn(1, 64, device=device).bfloat16().expand(3, 64)
    residual = torch.randn(3, 64, device=device).bfloat16()
    weight = (torch.rand(64, device=device) + 0.5).bfloat16()
    out, new_res = rms_norm(x, weight, 1e-6, residual)
    ref_out, ref_res = reference.rms_norm(x, weight, 1e-6, residual)
    _check(new_res, ref_res)
    _check(out, ref_out)
