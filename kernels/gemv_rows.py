"""A few rows times a 16-bit weight (Triton): decode steps of 2, 4 or 8 requests.

cuBLAS takes as long for 2-16 rows as for one (H200, the Llama-3.2-1B projections: qkv 6.6,
o 6.3, gate_up 20, down 14 us at any M <= 16; ``benchmarks/small_batch.py``), and a decode
step of a few requests also runs the norms, SiLU-and-mul and residual adds as kernels of
their own: a 1B step of 2 requests took 1.07 ms against 0.86 for one. This kernel is the
one-row GEMV (``kernels.gemv``) with a leading dimension of ROWS rows: each weight tile is
read once and multiplies every row, with the same fusions (RMSNorm of the input, residual
add, SiLU-and-mul of a [gate; up] weight, bias) and PDL, so a layer of a few requests is the
same five kernels as a lone one.

On CUDA cores each weight word costs ROWS x 4 FMAs: at ~4 TB/s of weights 8 rows use about
half the SMs' FP32 rate, so past 8 rows cuBLAS (tensor cores) takes over.
"""

import torch
import triton
import triton.language as tl

from kernels.gemv import _W16, GemvTiles, _load_tile, check_fusions, gemv_layout
from kernels.launch import cdiv
from kernels.pdl import pdl_launch, wait_for_predecessor
from kernels.weight_words import epilogue, halves_to_f32

GEMV_ROWS = (2, 4, 8)  # the row counts this kernel takes (decode graph buckets are 2, 4, 8)


@triton.jit
def _dot_rows(acc, words, x0, x1, x2, x3, W16: tl.constexpr):
    """acc [ROWS, BLOCK_N, BLOCK_W] += the four weights of each word times x0..x3."""
    w0, w1, w2, w3 = halves_to_f32(words, W16)
    acc = tl.fma(w0[None, :, :], x0, acc)
    acc = tl.fma(w1[None, :, :], x1, acc)
    acc = tl.fma(w2[None, :, :], x2, acc)
    return tl.fma(w3[None, :, :], x3, acc)


@triton.jit
def _gemv_rows_kernel(
    x_ptr,  # [ROWS, K] 16-bit, rows stride_xm apart (NORM: the residual stream, normed here)
    w_ptr,  # [N, K] of x's dtype, K % 4 == 0; GATED: [2N, K], gate then up rows
    bias_ptr,  # [N] (HAS_BIAS only; GATED: [2N])
    norm_ptr,  # [K] RMSNorm weight, x's dtype (NORM only)
    res_ptr,  # [ROWS, N] residual added to the output (RESIDUAL only)
    out_ptr,  # [ROWS, N]
    N,
    K,
    stride_xm,  # in elements, a multiple of 4
    stride_wn,  # in weights, a multiple of 4
    stride_rm,
    stride_om,
    up_offset,  # GATED: N * stride_wn, where the up rows start
    eps,  # NORM only
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN: tl.constexpr,  # N % BLOCK_N == 0 and K % BLOCK_K == 0: no masks
    GATED: tl.constexpr,
    W16: tl.constexpr,  # x's and the weight's dtype (bf16 / fp16)
    PREFETCH: tl.constexpr,  # K tiles requested ahead of the one being multiplied (0-2)
    NORM: tl.constexpr,
    RESIDUAL: tl.constexpr,
    PDL: tl.constexpr,
):
    """``kernels.gemv._gemv_kernel`` for ROWS rows at once: each program streams BLOCK_N
    weight rows (GATED: and their up rows) along K as int64 words of four weights, requests
    ``PREFETCH`` tiles ahead in registers, and multiplies every word by the four matching
    values of each of the ROWS rows of x (loaded in the word's layout, L1 hits) into a
    [ROWS, BLOCK_N, BLOCK_K / 4] fp32 accumulator, reduced once at the end. NORM and
    RESIDUAL as there, per row: x * g in the loop, each row's 1 / rms(x) after it."""
    BLOCK_W: tl.constexpr = BLOCK_K // 4
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, BLOCK_W)
    offs_m = tl.arange(0, ROWS)
    n_mask = offs_n < N
    words = w_ptr.to(tl.pointer_type(tl.int64), bitcast=True)
    rows = words + offs_n[:, None].to(tl.int64) * (stride_wn // 4) + offs_w[None, :]
    up = up_offset // 4
    # x as int64 words of four values, [ROWS, BLOCK_N, BLOCK_W]: each thread loads the words
    # its weight words multiply; the norm weight likewise, [1, BLOCK_N, BLOCK_W]
    x_words = x_ptr.to(tl.pointer_type(tl.int64), bitcast=True)
    x_cols = x_words + (offs_m * (stride_xm // 4))[:, None, None] + offs_w[None, None, :]
    x_cols += 0 * offs_n[None, :, None]
    g_cols = norm_ptr.to(tl.pointer_type(tl.int64), bitcast=True) + offs_w[None, None, :]
    g_cols += 0 * offs_n[None, :, None]
    last = (K - 1) // BLOCK_K * BLOCK_W  # first word of the last K tile
    w0, u0 = _load_tile(rows, up, 0, n_mask, offs_w, K, EVEN, GATED)
    if PREFETCH >= 2:
        w1, u1 = _load_tile(rows, up, tl.minimum(BLOCK_W, last), n_mask, offs_w, K, EVEN, GATED)
    wait_for_predecessor(PDL)
    acc = tl.zeros((ROWS, BLOCK_N, BLOCK_W), dtype=tl.float32)
    acc_up = tl.zeros((ROWS, BLOCK_N, BLOCK_W), dtype=tl.float32)
    sum_sq = tl.zeros((ROWS, BLOCK_K), dtype=tl.float32)  # NORM: x^2 along K, per row
    offs_k = tl.arange(0, BLOCK_K)
    for j0 in range(0, K // 4, BLOCK_W):
        if PREFETCH >= 1:  # request tile j0 + PREFETCH now, multiply it later
            jn = tl.minimum(j0 + PREFETCH * BLOCK_W, last)
            wn, un = _load_tile(rows, up, jn, n_mask, offs_w, K, EVEN, GATED)
        if EVEN:
            xw = tl.load(x_cols + j0)
        else:
            xw = tl.load(x_cols + j0, mask=(4 * (j0 + offs_w) < K)[None, None, :], other=0)
        x0, x1, x2, x3 = halves_to_f32(xw, W16)
        if NORM:  # x * g now, the common factor 1 / rms(x) after the loop
            ks = 4 * j0 + offs_k  # x again, [ROWS, BLOCK_K]: its squares once, not per row
            xk = tl.load(x_ptr + offs_m[:, None] * stride_xm + ks[None, :],
                         mask=(ks < K)[None, :], other=0.0).to(tl.float32)  # fmt: skip
            sum_sq = tl.fma(xk, xk, sum_sq)
            if EVEN:
                gw = tl.load(g_cols + j0)
            else:
                gw = tl.load(g_cols + j0, mask=(4 * (j0 + offs_w) < K)[None, None, :], other=0)
            g0, g1, g2, g3 = halves_to_f32(gw, W16)
            x0, x1, x2, x3 = x0 * g0, x1 * g1, x2 * g2, x3 * g3
        acc = _dot_rows(acc, w0, x0, x1, x2, x3, W16)
        if GATED:
            acc_up = _dot_rows(acc_up, u0, x0, x1, x2, x3, W16)
        if PREFETCH == 0:  # the next tile requested only after this one is multiplied
            w0, u0 = _load_tile(rows, up, j0 + BLOCK_W, n_mask, offs_w, K, False, GATED)
        elif PREFETCH == 1:
            w0, u0 = wn, un
        else:
            w0, u0, w1, u1 = w1, u1, wn, un
    out_dt = out_ptr.dtype.element_ty
    acc, acc_up = tl.sum(acc, axis=2), tl.sum(acc_up, axis=2)  # [ROWS, BLOCK_N]
    if NORM:
        inv_rms = tl.rsqrt(tl.sum(sum_sq, axis=1) / K + eps)[:, None]
        acc, acc_up = acc * inv_rms, acc_up * inv_rms
    out = epilogue(acc, acc_up, bias_ptr, bias_ptr, offs_n, n_mask, N, 1.0, False, HAS_BIAS,
                   GATED, out_dt)  # fmt: skip
    mask = n_mask[None, :]
    if RESIDUAL:
        res_rows = res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :]
        res = tl.load(res_rows, mask=mask, other=0.0).to(tl.float32)
        out = out.to(out_dt).to(tl.float32) + res
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], out.to(out_dt), mask=mask)


def takes_rows(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``linear_rows`` takes ``x`` [M, K] times ``weight``: M in GEMV_ROWS, x of the
    weight's dtype (bf16 / fp16) with rows of whole 8-byte words, a GEMV-readable weight."""
    return (
        x.dim() == 2
        and x.shape[0] in GEMV_ROWS
        and x.dtype == weight.dtype
        and x.dtype in _W16
        and x.stride(1) == 1
        and x.stride(0) % 4 == 0
        and x.data_ptr() % 8 == 0
        and gemv_layout(weight)
    )


def default_rows_tiles(rows: int, n: int, k: int, gated: bool = False) -> GemvTiles:
    """Tiles of the one-row GEMV (``kernels.gemv.default_tiles``); 8 rows take half the K
    tile, so the accumulators stay in registers."""
    if gated:
        return GemvTiles(4, 256 if rows >= 8 else 512, prefetch=1)
    if k >= 8192 or n >= 32768:
        return GemvTiles(2, 512 if rows >= 8 else 1024)
    return GemvTiles(2, 256 if rows >= 8 else 512)


def linear_rows(
    x: torch.Tensor,  # [M, K], M in GEMV_ROWS, takes_rows
    weight: torch.Tensor,  # [N, K] (gated: [2N, K]) of x's dtype
    bias: torch.Tensor | None = None,  # [N] (gated: [2N])
    *,
    gated: bool = False,
    norm: tuple[torch.Tensor, float] | None = None,  # (RMSNorm weight [K], eps) applied to x
    residual: torch.Tensor | None = None,  # [M, N] added to the output
    tiles: GemvTiles | None = None,
    out: torch.Tensor | None = None,  # [M, N] x's dtype, rows of stride 1: written instead
) -> torch.Tensor:  # [M, N]
    """``residual + act(rms_norm(x) @ weight.T + bias)`` for a few rows in one kernel, as
    ``kernels.gemv.linear_one_row`` computes each row (``kernels.reference.linear_one_row``
    within rounding: the normed x stays in fp32)."""
    assert takes_rows(x, weight), (
        f"linear_rows takes {GEMV_ROWS} rows of x of the weight's 16-bit dtype in whole 8-byte "
        f"words and a K-contiguous weight with K % 4 == 0; got x {x.dtype} "
        f"{tuple(x.shape)} stride {x.stride()}, weight {weight.dtype} {tuple(weight.shape)} "
        f"stride {weight.stride()}"
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
    if norm is not None:
        assert norm[0].data_ptr() % 8 == 0, "the norm weight is read as 8-byte words"
    if residual is not None:
        assert residual.shape == (m, n) and residual.stride(1) == 1, (
            f"residual {tuple(residual.shape)} stride {residual.stride()} vs ({m}, {n})"
        )
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    assert out.shape == (m, n) and out.dtype == x.dtype and out.stride(1) == 1, (
        f"out {out.dtype} {tuple(out.shape)} stride {out.stride()} must be {x.dtype} ({m}, {n})"
    )
    t = tiles or default_rows_tiles(m, n, k, gated)
    norm_weight, eps = norm if norm is not None else (x, 0.0)
    res = residual if residual is not None else out
    _gemv_rows_kernel[(cdiv(n, t.block_n),)](
        x, weight, bias if bias is not None else x, norm_weight, res, out, n, k,
        x.stride(0), weight.stride(0), res.stride(0), out.stride(0),
        n * weight.stride(0) if gated else 0, eps,
        ROWS=m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, HAS_BIAS=bias is not None,
        EVEN=n % t.block_n == 0 and k % t.block_k == 0, GATED=gated, W16=_W16[x.dtype],
        PREFETCH=t.prefetch, NORM=norm is not None, RESIDUAL=residual is not None,
        num_warps=t.num_warps, num_stages=1, **pdl_launch(x.device),
    )  # fmt: skip
    return out
