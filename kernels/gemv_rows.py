"""A few rows times a 16-bit weight (Triton): decode steps of 2-16 requests.

cuBLAS takes as long for 2-16 rows as for one (H200, the Llama-3.2-1B projections: qkv 6.6,
o 6.3, gate_up 20, down 14 us at any M <= 16, where the fused one-row GEMV takes 4.5, 3.5,
19.3, 11.0 for one row; ``benchmarks/small_batch.py``), and a decode step of a few requests
also runs SiLU-and-mul as a kernel of its own and breaks the PDL chain at each cuBLAS call.

Each program owns BLOCK_N weight rows and a K chunk, and streams them through tensor-core
dots with the rows of x padded to 16 (a dot's least M): the weight is read once for all
rows. BLOCK_N of 32-64 keeps x's re-reads (one [16, BLOCK_K] tile per weight tile) small
next to the weight's; small N then needs split-K to give the card enough programs: each
split writes its fp32 partial, and the last of a tile's splits to finish (an acquire-release
count) sums them in split order (deterministic) and runs the epilogue: the RMSNorm's 1 /
rms(x) from the splits' summed squares, bias, SiLU-and-mul, residual add. Two kernels built
before this one lost to cuBLAS (benchmarks/RESULTS.md, thirty-first session): FMAs of every
row on CUDA cores, and dots without split-K (too few programs for N <= 4096).
"""

import dataclasses
import functools
import math

import torch
import triton
import triton.language as tl

from kernels.gemv import _W16, check_fusions
from kernels.launch import cdiv, num_sms
from kernels.pdl import pdl_launch, wait_for_predecessor
from kernels.weight_words import epilogue

MAX_ROWS = 16  # rows this kernel takes (2 to 16: the dots' rows, padded)
_MAX_TILES = 8192  # counters (one per BLOCK_N tile) kept per device


@triton.jit
def _rows_kernel(
    x_ptr,  # [M, K] 16-bit, rows stride_xm apart (NORM: the residual stream, normed here)
    w_ptr,  # [N, K] of x's dtype; GATED: [2N, K], gate then up rows
    bias_ptr,  # [N] (HAS_BIAS only; GATED: [2N])
    norm_ptr,  # [K] RMSNorm weight, x's dtype (NORM only)
    res_ptr,  # [M, N] residual added to the output (RESIDUAL only)
    out_ptr,  # [M, N]
    part_ptr,  # [tiles, SPLIT, 2 if GATED else 1, BLOCK_M, BLOCK_N] fp32 (SPLIT > 1)
    sq_ptr,  # [tiles, SPLIT, BLOCK_M] fp32: the splits' sums of squares (NORM, SPLIT > 1)
    count_ptr,  # [tiles] int32, zero between launches (SPLIT > 1)
    M,
    N,
    K,
    k_per_split,  # a multiple of BLOCK_K
    stride_xm,
    stride_wn,
    stride_rm,
    stride_om,
    up_offset,  # GATED: N * stride_wn, where the up rows start
    eps,  # NORM only
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr,  # 16
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GATED: tl.constexpr,
    NORM: tl.constexpr,
    RESIDUAL: tl.constexpr,
    PDL: tl.constexpr,
):
    """``residual + act(rms_norm(x) @ W.T + b)`` for up to BLOCK_M rows. NORM: the dots take
    x * g rounded to x's dtype, and x's squares summed from the same loads give each row's
    1 / rms(x), applied to the sums at the end (the RMSNorm kernel rounds x / rms * g
    instead: within rounding)."""
    tile, split = tl.program_id(0), tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask, n_mask = offs_m < M, offs_n < N
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    x_rows = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    wait_for_predecessor(PDL)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_mask = (k0 + offs_k) < k_end
        x = tl.load(x_rows + k0, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if NORM:
            xf = x.to(tl.float32)
            sq += tl.sum(xf * xf, axis=1)
            g = tl.load(norm_ptr + k0 + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            x = (xf * g[None, :]).to(x_ptr.dtype.element_ty)
        w_mask = n_mask[:, None] & k_mask[None, :]
        w = tl.load(w_rows + k0, mask=w_mask, other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
        if GATED:
            u = tl.load(w_rows + up_offset + k0, mask=w_mask, other=0.0)
            acc_up = tl.dot(x, tl.trans(u), acc_up)
    if SPLIT > 1:  # publish this split's partial; the tile's last split finishes the tile
        tile_mn = offs_m[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        halves: tl.constexpr = 2 if GATED else 1
        mine = part_ptr + ((tile * SPLIT + split) * halves) * (BLOCK_M * BLOCK_N)
        tl.store(mine + tile_mn, acc)
        if GATED:
            tl.store(mine + BLOCK_M * BLOCK_N + tile_mn, acc_up)
        if NORM:
            tl.store(sq_ptr + (tile * SPLIT + split) * BLOCK_M + offs_m, sq)
        tl.debug_barrier()  # every thread's stores before the count's release
        done = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if done == SPLIT - 1:
            tl.debug_barrier()  # the acquire before any thread's loads (.cg: from L2)
            tl.store(count_ptr + tile, 0)  # for the next launch
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for s in range(SPLIT):  # in split order: the same sums whoever finishes last
                part = part_ptr + ((tile * SPLIT + s) * halves) * (BLOCK_M * BLOCK_N)
                acc += tl.load(part + tile_mn, cache_modifier=".cg")
                if GATED:
                    acc_up += tl.load(part + BLOCK_M * BLOCK_N + tile_mn, cache_modifier=".cg")
                if NORM:
                    sq += tl.load(sq_ptr + (tile * SPLIT + s) * BLOCK_M + offs_m,
                                  cache_modifier=".cg")  # fmt: skip
            _finish(acc, acc_up, sq, bias_ptr, res_ptr, out_ptr, offs_m, offs_n, m_mask, n_mask,
                    N, K, stride_rm, stride_om, eps, HAS_BIAS, GATED, NORM, RESIDUAL)  # fmt: skip
    else:
        _finish(acc, acc_up, sq, bias_ptr, res_ptr, out_ptr, offs_m, offs_n, m_mask, n_mask,
                N, K, stride_rm, stride_om, eps, HAS_BIAS, GATED, NORM, RESIDUAL)  # fmt: skip


@triton.jit
def _finish(acc, acc_up, sq, bias_ptr, res_ptr, out_ptr, offs_m, offs_n, m_mask, n_mask, N, K,
            stride_rm, stride_om, eps, HAS_BIAS: tl.constexpr, GATED: tl.constexpr,
            NORM: tl.constexpr, RESIDUAL: tl.constexpr):  # fmt: skip
    """The tile's epilogue from its fp32 sums: 1 / rms, bias, SiLU-and-mul, residual."""
    out_dt = out_ptr.dtype.element_ty
    if NORM:
        inv_rms = tl.rsqrt(sq / K + eps)[:, None]
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
    """The few-row kernel's launch: ``block_n`` weight rows per program, ``block_k`` of K per
    step (powers of 2, >= 16), ``num_stages`` weight tiles in flight, ``split`` K chunks per
    tile (None: enough programs for twice the SMs)."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 4
    split: int | None = None

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k"):
            v = getattr(self, name)
            assert v >= 16 and v & (v - 1) == 0, f"{name} {v} must be a power of 2 >= 16"
        assert self.split is None or self.split >= 1, f"split {self.split} must be >= 1"


def default_rows_tiles(n: int, k: int, gated: bool = False, norm: bool = False) -> RowsTiles:
    """From an H200 sweep of the Llama-3.2-1B / 3-8B projections without split-K
    (``benchmarks/small_batch.py --cases rows``): 64 rows a tile where x is normed in the
    loop (qkv, gate_up) or N is wide (LM heads), else 32 rows and six stages."""
    if gated or norm or n >= 32768:
        return RowsTiles(64, 128, 4, 4)
    return RowsTiles(32, 128, 4, 6)


def split_for(tiles: int, k: int, block_k: int, sms: int) -> int:
    """K chunks per tile so that tiles x chunks reach twice the SMs, a K tile or more each."""
    return max(1, min(math.ceil(2 * sms / tiles), k // block_k))


@functools.cache
def _counters(device: torch.device) -> torch.Tensor:
    # NOTE: shared by every launch on the device: kernels of one stream run one after
    # another (under PDL a kernel touches them only after its wait), and each launch's last
    # splits zero what they counted.
    return torch.zeros(_MAX_TILES, dtype=torch.int32, device=device)


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
    t = tiles or default_rows_tiles(n, k, gated, norm is not None)
    num_tiles = cdiv(n, t.block_n)
    assert num_tiles <= _MAX_TILES, f"{num_tiles} tiles of {t.block_n} rows > {_MAX_TILES}"
    split = t.split or split_for(num_tiles, k, t.block_k, num_sms(x.device))
    k_per_split = cdiv(cdiv(k, split), t.block_k) * t.block_k
    split = cdiv(k, k_per_split)  # no empty chunk
    halves = 2 if gated else 1
    part = x.new_empty((num_tiles * split * halves * MAX_ROWS * t.block_n,), dtype=torch.float32)
    sq = x.new_empty((num_tiles * split * MAX_ROWS,), dtype=torch.float32)
    norm_weight, eps = norm if norm is not None else (x, 0.0)
    res = residual if residual is not None else out
    _rows_kernel[(num_tiles, split)](
        x, weight, bias if bias is not None else x, norm_weight, res, out, part, sq,
        _counters(x.device), m, n, k, k_per_split, x.stride(0), weight.stride(0),
        res.stride(0), out.stride(0), n * weight.stride(0) if gated else 0, eps,
        SPLIT=split, BLOCK_M=MAX_ROWS, BLOCK_N=t.block_n, BLOCK_K=t.block_k,
        HAS_BIAS=bias is not None, GATED=gated, NORM=norm is not None,
        RESIDUAL=residual is not None, num_warps=t.num_warps, num_stages=t.num_stages,
        **pdl_launch(x.device),
    )  # fmt: skip
    return out
