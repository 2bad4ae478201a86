"""Weight-only 8-bit matmul (W8A16, Triton): ``out = (x @ q.T) * scale + bias`` for int8 or
fp8 e4m3 weights; and ``fp8_quantize_rows``, the per-token activation quantization of fp8 W8A8.

The weight stays 8-bit in memory and is widened tile by tile in registers (via fp32; exact:
|q| <= 127 fits the 8-bit mantissa of bf16, as every e4m3 value does); the per-output-channel scale
multiplies the fp32 accumulator once, after the K loop. Decode is weight-bandwidth bound, so
reading 1 byte per weight instead of 2 is the whole point; small-M launches split K across
programs (partials in fp32, summed in a fixed order: deterministic) to fill the GPU.

One row (batch-1 decode) runs the GEMV of ``kernels.gemv`` instead of tensor-core tiles.
``gated=True`` takes a merged [gate; up] weight (SwiGLU) and returns ``silu(gate) * up``:
in the GEMV each program accumulates gate rows and the matching up rows, so the activation
runs in the epilogue instead of a separate kernel over a [1, 2N] intermediate.
"""

import dataclasses
import math

import torch
import triton
import triton.language as tl

from kernels.attention_tile import dot_precision
from kernels.gemv import check_fusions, gemv, gemv_layout
from kernels.launch import cdiv, next_power_of_2, num_sms, ptx_widening
from kernels.pdl import pdl_launch, wait_for_predecessor
from kernels.weight_words import epilogue, i8x4_tile_to_f32


@triton.jit
def _load_raw(ptrs, mask, EVEN: tl.constexpr):
    """An int8 / fp8 weight tile as stored; masked lanes undefined until ``_widen``."""
    return tl.load(ptrs) if EVEN else tl.load(ptrs, mask=mask)


@triton.jit
def _widen(w, mask, EVEN: tl.constexpr, FAST_I8: tl.constexpr):
    """A raw int8 / fp8 weight tile widened to fp32, masked lanes zero.

    NOTE: via fp32 (exact for int8 and e4m3): Triton 3.9's interpreter casts int8 -> bf16 as
    raw bits. Masked lanes are zeroed after the widening: an integer ``other`` does not
    compile for fp8 pointers. FAST_I8 (int8 on a GPU; inline PTX cannot run in the
    interpreter) widens with ``i8x4_tile_to_f32``.
    """
    w = i8x4_tile_to_f32(w) if FAST_I8 else w.to(tl.float32)
    return w if EVEN else tl.where(mask, w, 0.0)


@triton.jit(do_not_specialize=["M"])  # the token count changes every step: no recompiles
def _w8a16_kernel(
    x_ptr,  # [M, K] fp32 / fp16 / bf16
    w_ptr,  # [N, K] int8 (or fp8 e4m3)
    scale_ptr,  # [N] fp32
    bias_ptr,  # [N] (HAS_BIAS only)
    out_ptr,  # [SPLIT_K, M, N]: the output itself when SPLIT_K == 1, else fp32 partials
    M,
    N,
    K,
    k_per_split,  # multiple of BLOCK_K
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_os,
    stride_om,
    stride_on,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,  # every split is whole K tiles: no K masks
    EVEN_N: tl.constexpr,  # N % BLOCK_N == 0: unmasked (vectorizable) weight loads
    DOT_PRECISION: tl.constexpr,
    FAST_I8: tl.constexpr,  # int8 weights widened by i8x4_tile_to_f32
    PDL: tl.constexpr,
):
    wait_for_predecessor(PDL)
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask, n_mask = offs_m < M, offs_n < N
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    w_cols = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn
    k_lo = pid_k * k_per_split
    k_hi = k_lo + k_per_split if EVEN_K else tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + offs_k
        x_mask = m_mask[:, None] if EVEN_K else m_mask[:, None] & (ks < k_hi)[None, :]
        x = tl.load(x_rows + ks[None, :] * stride_xk, mask=x_mask, other=0.0)
        # [BLOCK_K, BLOCK_N]: the weight tile read transposed, widened in registers
        w_ptrs = w_cols + ks[:, None] * stride_wk
        w_mask = n_mask[None, :] if EVEN_K else (ks < k_hi)[:, None] & n_mask[None, :]
        w = _widen(_load_raw(w_ptrs, w_mask, EVEN_K and EVEN_N), w_mask, EVEN_K and EVEN_N, FAST_I8)
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=DOT_PRECISION)
    acc = epilogue(acc, acc, scale_ptr, bias_ptr, offs_n, n_mask, N,
                    (pid_k == 0).to(tl.float32),  # the bias is added by one split only
                    True, HAS_BIAS, False, out_ptr.dtype.element_ty)  # fmt: skip
    out = out_ptr + pid_k * stride_os + offs_m[:, None].to(tl.int64) * stride_om
    tl.store(out + offs_n[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])  # fmt: skip


@dataclasses.dataclass(frozen=True)
class W8A16Config:
    """Tile sizes and launch settings; ``split_k`` cuts K across programs (1 = no split).
    ``block_m == 1`` selects the single-row GEMV kernel (M must be 1; split_k unused)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3  # the tiled kernel's pipeline depth (the GEMV pipelines by prefetch)
    prefetch: int = 1  # GEMV: K tiles requested ahead of the one being multiplied (0-2)

    def __post_init__(self) -> None:
        assert 0 <= self.prefetch <= 2, f"prefetch {self.prefetch} must be 0, 1 or 2"
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            assert v >= 1 and v & (v - 1) == 0, f"{name} {v} must be a power of 2"
        assert self.block_m > 1 or self.block_k >= 4, (
            f"block_k {self.block_k} must be >= 4 for the GEMV (block_m 1: words of four weights)"
        )
        assert self.split_k >= 1, f"split_k {self.split_k} must be >= 1"


def default_config(m: int, n: int, k: int, sm_count: int) -> W8A16Config:
    """Small M (decode) is a weight stream: narrow N tiles give every SM programs without
    splitting K (a split costs two extra kernels); K is split only when N is too small for
    that. One row runs the GEMV kernel, tiles picked per shape class from graph replays of
    the 8B projections on an H200 (``quant_offload.py --cases tune``: long K 2 x 2048, wide
    N 8 x 512, else 4 x 1024; gated, the tile's rows are gate rows, each with its up row).
    Large M (prefill) is compute bound: square tensor-core tiles."""
    if m == 1:
        if k >= 8192:
            return W8A16Config(1, 2, 2048, num_warps=4, num_stages=1)
        if n >= 128 * sm_count:
            return W8A16Config(1, 8, 512, num_warps=4, num_stages=1)
        return W8A16Config(1, 4, 1024, num_warps=4, num_stages=1)
    if m <= 64:
        block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
        block_n = 32 if math.ceil(n / 32) >= 2 * sm_count else 16
        block_k = 256
        tiles = math.ceil(m / block_m) * math.ceil(n / block_n)
        split = 1
        if tiles < sm_count:
            split = max(1, min(math.ceil(2 * sm_count / tiles), math.ceil(k / block_k) // 2, 16))
        return W8A16Config(block_m, block_n, block_k, split, num_warps=4, num_stages=4)
    if m <= 256:
        return W8A16Config(64, 128, 64, num_warps=4, num_stages=4)
    return W8A16Config(128, 128, 64, num_warps=8, num_stages=3)


def w8a16_matmul(
    x: torch.Tensor,  # [..., K] fp32 / fp16 / bf16
    qweight: torch.Tensor,  # [N, K] int8 (or float8_e4m3fn: fp8 weights, weight-only)
    scale: torch.Tensor,  # [N] fp32, per output channel
    bias: torch.Tensor | None = None,  # [N]
    config: W8A16Config | None = None,
    *,
    gated: bool = False,
    norm: tuple[torch.Tensor, float] | None = None,  # one row: (RMSNorm weight [K], eps)
    residual: torch.Tensor | None = None,  # one row: [1, N] added to the output
) -> torch.Tensor:  # [..., N] in x.dtype (gated: [..., N / 2])
    """Same semantics as ``kernels.reference.w8a16_linear``; with ``gated`` (a merged
    [gate; up] weight), as ``kernels.reference.silu_and_mul`` of that: fused into the GEMV's
    epilogue (one row; ``config`` tiles the output columns, each paired with its up row),
    else the matmul then the activation kernel. ``norm`` and ``residual`` (the GEMV only)
    as in ``kernels.gemv.linear_one_row``."""
    assert x.dtype in (torch.float32, torch.float16, torch.bfloat16), f"x {x.dtype}"
    assert qweight.dtype in (torch.int8, torch.float8_e4m3fn) and qweight.dim() == 2, (
        f"qweight {qweight.dtype} {tuple(qweight.shape)} must be a 2-D int8 / fp8 tensor"
    )
    rows, k = qweight.shape
    assert x.shape[-1] == k, f"x {tuple(x.shape)} vs qweight {tuple(qweight.shape)}"
    assert scale.dtype == torch.float32 and scale.shape == (rows,), (
        f"scale {scale.dtype} {tuple(scale.shape)} must be fp32 ({rows},)"
    )
    assert scale.is_contiguous(), "scale must be contiguous"
    if bias is not None:
        assert bias.shape == (rows,) and bias.is_contiguous(), (
            f"bias {tuple(bias.shape)} vs ({rows},)"
        )
    assert not gated or rows % 2 == 0, f"gated needs [gate; up] rows, got {rows}"
    assert x.device == qweight.device == scale.device, "x, qweight and scale on one device"
    x2 = x.reshape(-1, k)  # [M, K]
    m, n = x2.shape[0], rows // 2 if gated else rows
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out.view(*x.shape[:-1], n)
    int8 = qweight.dtype == torch.int8
    cfg = config or default_config(m, rows, k, num_sms(x.device))
    if config is None and cfg.block_m == 1 and not gemv_layout(qweight):
        cfg = default_config(2, rows, k, num_sms(x.device))  # the tiled kernel's tiles
    assert cfg.block_m == 1 or (norm is None and residual is None), (
        f"norm / residual fuse into the one-row GEMV only, got {m} rows and {cfg}"
    )
    if gated and cfg.block_m != 1:  # the tiled kernel has no gated epilogue
        from kernels.activation import silu_and_mul

        return silu_and_mul(w8a16_matmul(x2, qweight, scale, bias, cfg)).view(*x.shape[:-1], n)
    if cfg.block_m == 1:
        assert m == 1, f"the GEMV config takes one row, got {m}"
        check_fusions(x2, n, norm, residual)
        assert gemv_layout(qweight), (
            f"the GEMV reads 4-byte words: it needs a K-contiguous weight, K % 4 == 0 and rows "
            f"4-byte aligned; got shape {tuple(qweight.shape)}, stride {qweight.stride()}"
        )
        gemv(x2, qweight, out, cfg.block_n, cfg.block_k, cfg.num_warps, prefetch=cfg.prefetch,
             scale=scale, bias=bias, gated=gated, norm=norm, residual=residual,
             ptx=ptx_widening(x.device))  # fmt: skip
        return out.view(*x.shape[:-1], n)
    k_per_split = math.ceil(math.ceil(k / cfg.split_k) / cfg.block_k) * cfg.block_k
    split = math.ceil(k / k_per_split)  # rounding can leave fewer non-empty splits
    target = out if split == 1 else torch.empty((split, m, n), dtype=torch.float32,
                                                device=x.device)  # fmt: skip
    grid = (cdiv(m, cfg.block_m), cdiv(n, cfg.block_n), split)
    _w8a16_kernel[grid](
        x2, qweight, scale, bias if bias is not None else scale, target,
        m, n, k, k_per_split,
        x2.stride(0), x2.stride(1), qweight.stride(0), qweight.stride(1),
        target.stride(0) if split > 1 else 0, target.stride(-2), target.stride(-1),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        HAS_BIAS=bias is not None, EVEN_K=k % k_per_split == 0, EVEN_N=n % cfg.block_n == 0,
        DOT_PRECISION=dot_precision(x.dtype), FAST_I8=int8 and ptx_widening(x.device),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_launch(x.device),
    )  # fmt: skip
    if split > 1:
        out = target.sum(0).to(x.dtype)  # fixed reduction order: deterministic
    return out.view(*x.shape[:-1], n)


@triton.jit
def _fp8_quantize_rows_kernel(
    x_ptr,  # [M, K] fp32 / fp16 / bf16
    q_ptr,  # [M, K] float8_e4m3fn
    scale_ptr,  # [M] fp32
    K,
    stride_x,
    stride_q,
    FP8_MAX: tl.constexpr,
    MIN_SCALE: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    mask = offs < K
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), 0) / FP8_MAX, MIN_SCALE)
    q = tl.clamp(x / scale, -FP8_MAX, FP8_MAX)
    tl.store(q_ptr + row * stride_q + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, scale)


def fp8_quantize_rows(
    x: torch.Tensor,  # [M, K] fp32 / fp16 / bf16
) -> tuple[torch.Tensor, torch.Tensor]:  # (float8_e4m3fn [M, K], fp32 scale [M])
    """Dynamic per-token fp8 quantization in one pass (amax, scale, cast); same semantics as
    ``kernels.reference.fp8_quantize_rows``."""
    assert x.dim() == 2 and x.stride(1) == 1, f"x {tuple(x.shape)} needs a dense last dim"
    assert x.dtype in (torch.float32, torch.float16, torch.bfloat16), f"x {x.dtype}"
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scale
    block = next_power_of_2(k)
    _fp8_quantize_rows_kernel[(m,)](
        x, q, scale, k, x.stride(0), q.stride(0),
        FP8_MAX=torch.finfo(torch.float8_e4m3fn).max, MIN_SCALE=1e-12, BLOCK_K=block,
        num_warps=min(max(block // 512, 1), 16),
    )  # fmt: skip
    return q, scale
