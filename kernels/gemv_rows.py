"""A few rows times a 16-bit weight (Triton): decode steps of 2-16 requests.

cuBLAS takes as long for 2-16 rows as for one (H200, the Llama-3.2-1B projections: qkv 6.6,
o 6.3, gate_up 20, down 14 us at any M <= 16; ``benchmarks/small_batch.py``), and a decode
step of a few requests also runs the norms, SiLU-and-mul and residual adds as kernels of
their own: a 1B step of 2 requests took 1.07 ms against 0.86 for one. This kernel takes
the one-row GEMV's fusions (``kernels.gemv``: RMSNorm of the input, residual add,
SiLU-and-mul of a [gate; up] weight, bias) and PDL to a few rows, so a layer of a few
requests is the same five kernels as a lone one.

Each program streams BLOCK_N weight rows along K through tensor-core dots with the rows of
x padded to 16 (a dot's least M): the weight is read once for every row, and the dots cost
the SMs little where the one-row GEMV's FMAs per weight would grow with the rows (a first,
FMA version of this kernel ran 2 rows of the 1B qkv in 10 us and 8 rows in 23 us).
"""

import dataclasses

import torch
import triton
import triton.language as tl

from kernels.gemv import _W16, check_fusions
from kernels.launch import cdiv
from kernels.pdl import pdl_launch, wait_for_predecessor
from kernels.weight_words import epilogue

MAX_ROWS = 16  # rows this kernel takes (2 to 16: the dots' rows, padded)


@triton.jit
def _gemv_rows_kernel(
    x_ptr,  # [M, K] 16-bit, rows stride_xm apart (NORM: the residual stream, normed here)
    w_ptr,  # [N, K] of x's dtype; GATED: [2N, K], gate then up rows
    bias_ptr,  # [N] (HAS_BIAS only; GATED: [2N])
    norm_ptr,  # [K] RMSNorm weight, x's dtype (NORM only)
    res_ptr,  # [M, N] residual added to the output (RESIDUAL only)
    out_ptr,  # [M, N]
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_rm,
    stride_om,
    up_offset,  # GATED: N * stride_wn, where the up rows start
    eps,  # NORM only
    BLOCK_M: tl.constexpr,  # 16
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GATED: tl.constexpr,
    NORM: tl.constexpr,
    RESIDUAL: tl.constexpr,
    PDL: tl.constexpr,
):
    """``residual + act(rms_norm(x) @ W.T + b)`` for up to BLOCK_M rows: each program owns
    BLOCK_N weight rows (GATED: and their up rows) and runs along K, the weight tiles
    pipelined (num_stages) into dots with x's tile. NORM: the dots take x * g rounded to
    x's dtype, and x's squares summed from the same loads give each row's 1 / rms(x),
    applied to the sums after the loop (the RMSNorm kernel rounds x * 1 / rms * g instead:
    within rounding)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask, n_mask = offs_m < M, offs_n < N
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    x_rows = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    wait_for_predecessor(PDL)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    sum_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        x = tl.load(x_rows + k0, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if NORM:
            xf = x.to(tl.float32)
            sum_sq += tl.sum(xf * xf, axis=1)
            g = tl.load(norm_ptr + k0 + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            x = (xf * g[None, :]).to(x_ptr.dtype.element_ty)
        w_mask = n_mask[:, None] & k_mask[None, :]
        w = tl.load(w_rows + k0, mask=w_mask, other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
        if GATED:
            u = tl.load(w_rows + up_offset + k0, mask=w_mask, other=0.0)
            acc_up = tl.dot(x, tl.trans(u), acc_up)
    out_dt = out_ptr.dtype.element_ty
    if NORM:
        inv_rms = tl.rsqrt(sum_sq / K + eps)[:, None]
        acc, acc_up = acc * inv_rms, acc_up * inv_rms
    out = epilogue(acc, acc_up, bias_ptr, bias_ptr, offs_n, n_mask, N, 1.0, False, HAS_BIAS,
                   GATED, out_dt)  # fmt: skip
    mask = m_mask[:, None] & n_mask[None, :]
    if RESIDUAL:
        res = tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=mask,
                      other=0.0).to(tl.float32)  # fmt: skip
        out = out.to(out_dt).to(tl.float32) + res
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], out.to(out_dt), mask=mask)


def takes_rows(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``linear_rows`` takes ``x`` [M, K] times ``weight``: 2 <= M <= MAX_ROWS, x of
    the weight's dtype (bf16 / fp16), both K-contiguous."""
    return (
        x.dim() == 2
        and 2 <= x.shape[0] <= MAX_ROWS
        and x.dtype == weight.dtype
        and x.dtype in _W16
        and x.stride(1) == 1
        and weight.dim() == 2
        and weight.stride(1) == 1
    )


@dataclasses.dataclass(frozen=True)
class RowsTiles:
    """The few-row kernel's launch: ``block_n`` weight rows per program, ``block_k`` of K
    per step (powers of 2, >= 16), ``num_stages`` weight tiles in flight."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 4

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k"):
            v = getattr(self, name)
            assert v >= 16 and v & (v - 1) == 0, f"{name} {v} must be a power of 2 >= 16"


def default_rows_tiles(n: int, k: int, gated: bool = False) -> RowsTiles:
    """From an H200 sweep of the Llama-3.2-1B / 3-8B projections (``benchmarks/
    small_batch.py --cases rows``)."""
    return RowsTiles(16, 256, 4, 4)


def linear_rows(
    x: torch.Tensor,  # [M, K], 2 <= M <= MAX_ROWS, takes_rows
    weight: torch.Tensor,  # [N, K] (gated: [2N, K]) of x's dtype
    bias: torch.Tensor | None = None,  # [N] (gated: [2N])
    *,
    gated: bool = False,
    norm: tuple[torch.Tensor, float] | None = None,  # (RMSNorm weight [K], eps) applied to x
    residual: torch.Tensor | None = None,  # [M, N] added to the output
    tiles: RowsTiles | None = None,
    out: torch.Tensor | None = None,  # [M, N] x's dtype, rows of stride 1: written instead
) -> torch.Tensor:  # [M, N]
    """``residual + act(rms_norm(x) @ weight.T + bias)`` for a few rows in one kernel
    (``kernels.reference.linear_one_row`` within rounding), as ``kernels.gemv.linear_one_row``
    does for one."""
    assert takes_rows(x, weight), (
        f"linear_rows takes 2 to {MAX_ROWS} K-contiguous rows of x times a K-contiguous "
        f"weight of x's 16-bit dtype; got x {x.dtype} {tuple(x.shape)} stride {x.stride()}, "
        f"weight {weight.dtype} {tuple(weight.shape)} stride {weight.stride()}"
    )
    m, k = x.shape
    rows = weight.shape[0]
    assert weight.shape[1] == k, f"x {tuple(x.shape)} vs weight {tuple(weight.shape)}"
    assert not gated or rows % 2 == 0, f"gated needs [gate; up] rows, got {rows}"
    n = rows // 2 if gated else rows
    if bias is not None:
        assert bias.shape == (rows,) and bias.is_contiguous(), (
            f"bias {tuple(bias.shape)} vs ({rows},)"
        )
    check_fusions(x, n, norm, residual)
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    assert out.shape == (m, n) and out.dtype == x.dtype and out.stride(1) == 1, (
        f"out {out.dtype} {tuple(out.shape)} stride {out.stride()} must be {x.dtype} ({m}, {n})"
    )
    t = tiles or default_rows_tiles(n, k, gated)
    norm_weight, eps = norm if norm is not None else (x, 0.0)
    res = residual if residual is not None else out
    _gemv_rows_kernel[(cdiv(n, t.block_n),)](
        x, weight, bias if bias is not None else x, norm_weight, res, out, m, n, k,
        x.stride(0), weight.stride(0), res.stride(0), out.stride(0),
        n * weight.stride(0) if gated else 0, eps,
        BLOCK_M=MAX_ROWS, BLOCK_N=t.block_n, BLOCK_K=t.block_k, HAS_BIAS=bias is not None,
        GATED=gated, NORM=norm is not None, RESIDUAL=residual is not None,
        num_warps=t.num_warps, num_stages=t.num_stages, **pdl_launch(x.device),
    )  # fmt: skip
    return out
