"""SiLU(gate) * up in one pass over the fused gate_up projection output (Triton)."""

import torch
import triton
import triton.language as tl

from kernels.launch import cdiv, next_power_of_2
from kernels.pdl import pdl_launch, wait_for_predecessor


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,  # [num_tokens, 2 * d]: gate | up
    out_ptr,  # [num_tokens, d]
    stride_x,
    stride_o,
    D: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_predecessor(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + D + offs, mask=mask, other=0.0).to(tl.float32)
    # Reference: silu(gate) rounded to the input dtype, times up, rounded again.
    act = (gate * tl.sigmoid(gate)).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [num_tokens, 2 * d] -> [num_tokens, d]
    """``silu(x[:, :d]) * x[:, d:]`` without materialising either half."""
    assert x.dim() == 2 and x.shape[1] % 2 == 0, f"x {tuple(x.shape)} must be [tokens, 2 * d]"
    assert x.stride(1) == 1, "x needs a dense last dim"
    assert x.dtype in (torch.float32, torch.float16, torch.bfloat16), f"x {x.dtype}"
    num_tokens, d = x.shape[0], x.shape[1] // 2
    out = torch.empty(num_tokens, d, dtype=x.dtype, device=x.device)
    if num_tokens:
        block = min(next_power_of_2(d), 1024)
        grid = (num_tokens, cdiv(d, block))
        _silu_and_mul_kernel[grid](x, out, x.stride(0), out.stride(0), D=d, BLOCK=block,
                                   num_warps=4, **pdl_launch(x.device))  # fmt: skip
    return out
