"""RMSNorm with an optional fused residual add (Triton); one program per token row."""

import torch
import triton
import triton.language as tl

from kernels.launch import next_power_of_2
from kernels.pdl import pdl_launch, wait_for_predecessor


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [num_tokens, hidden]
    residual_ptr,  # [num_tokens, hidden] (HAS_RESIDUAL only)
    weight_ptr,  # [hidden]
    out_ptr,  # [num_tokens, hidden]
    residual_out_ptr,  # [num_tokens, hidden] (HAS_RESIDUAL only)
    eps,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    HIDDEN: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_predecessor(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < HIDDEN
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0)
        # NOTE: round the sum to the input dtype before the norm, as the reference does.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(residual_out_ptr + row * stride_ro + offs, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(xf * xf, 0) / HIDDEN + eps)
    # Reference: (x * inv_rms).to(x.dtype) * weight, the product rounded to the output dtype.
    normed = (xf * inv_rms).to(x.dtype).to(tl.float32)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm, optionally fused with the residual add: returns (normed, new_residual).

    With a residual, ``new_residual = x + residual`` and the norm is taken of that sum.
    Inputs are not modified; the output dtype follows torch promotion of (x, weight).
    """
    hidden = x.shape[-1]
    assert weight.shape == (hidden,), f"weight {tuple(weight.shape)} != ({hidden},)"
    assert x.dtype in (torch.float32, torch.float16, torch.bfloat16), f"x {x.dtype}"
    x2 = x.reshape(-1, hidden)
    assert x2.stride(-1) == 1, "x needs a dense last dim"
    weight = weight.contiguous()
    out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    res2 = res_out = None
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype, (
            f"residual {tuple(residual.shape)} {residual.dtype} vs x {tuple(x.shape)} {x.dtype}"
        )
        res2 = residual.reshape(-1, hidden)
        assert res2.stride(-1) == 1, "residual needs a dense last dim"
        res_out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    num_rows = x2.shape[0]
    if num_rows > 0:
        block = next_power_of_2(hidden)
        _rms_norm_kernel[(num_rows,)](
            x2, res2 if res2 is not None else x2, weight, out,
            res_out if res_out is not None else out, eps,
            x2.stride(0), res2.stride(0) if res2 is not None else 0, out.stride(0),
            res_out.stride(0) if res_out is not None else 0,
            HIDDEN=hidden, BLOCK=block, HAS_RESIDUAL=residual is not None,
            num_warps=min(max(block // 256, 1), 16), **pdl_launch(x.device),
        )  # fmt: skip
    out = out.view(x.shape)
    return out, (res_out.view(x.shape) if res_out is not None else None)
