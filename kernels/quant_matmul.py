"""Weight-only int8 matmul (W8A16, Triton): ``out = (x @ q.T) * scale + bias``.

The weight stays int8 in memory and is widened to the activation dtype tile by tile in
registers (exact: |q| <= 127 fits the 8-bit mantissa of bf16); the per-output-channel scale
multiplies the fp32 accumulator once, after the K loop. Decode is weight-bandwidth bound, so
reading 1 byte per weight instead of 2 is the whole point; small-M launches split K across
programs (partials in fp32, summed in a fixed order: deterministic) to fill the GPU.
"""

import dataclasses
import math

import torch
import triton
import triton.language as tl

from kernels.paged_attention import dot_precision, num_sms


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
):
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
        # NOTE: via fp32 (exact for int8 and e4m3): Triton 3.9's interpreter casts int8 -> bf16
        # as raw bits. Masked lanes are zeroed after the widening: an integer ``other`` does
        # not compile for fp8 pointers.
        if EVEN_K and EVEN_N:
            w = tl.load(w_ptrs).to(tl.float32)
        else:
            w_mask = n_mask[None, :] if EVEN_K else (ks < k_hi)[:, None] & n_mask[None, :]
            w = tl.where(w_mask, tl.load(w_ptrs, mask=w_mask).to(tl.float32), 0.0)
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=DOT_PRECISION)
    scale = tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)
    acc = acc * scale[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc += bias[None, :] * (pid_k == 0).to(tl.float32)  # added by one split only
    out = out_ptr + pid_k * stride_os + offs_m[:, None].to(tl.int64) * stride_om
    tl.store(out + offs_n[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])  # fmt: skip


@triton.jit
def _w8_gemv_kernel(
    x_ptr,  # [K] one dense row, fp32 / fp16 / bf16
    w_ptr,  # [N, K] int8 (or fp8 e4m3)
    scale_ptr,  # [N] fp32
    bias_ptr,  # [N] (HAS_BIAS only)
    out_ptr,  # [N]
    N,
    K,
    stride_wn,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN: tl.constexpr,  # N % BLOCK_N == 0 and K % BLOCK_K == 0: no masks
):
    """One row times the weight: each program streams BLOCK_N weight rows along K
    (contiguous, vectorized loads), multiplies in fp32 registers and reduces once at the end;
    no tensor-core tile is padded out from a single row."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        if EVEN:
            w = tl.load(rows + ks[None, :]).to(tl.float32)
            x = tl.load(x_ptr + ks)
        else:  # masked lanes zeroed after widening (see _w8a16_kernel)
            k_mask = ks < K
            w_mask = n_mask[:, None] & k_mask[None, :]
            w = tl.where(w_mask, tl.load(rows + ks[None, :], mask=w_mask).to(tl.float32), 0.0)
            x = tl.load(x_ptr + ks, mask=k_mask, other=0.0)
        acc += w * x.to(tl.float32)[None, :]
    out = tl.sum(acc, axis=1) * tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_n, out.to(out_ptr.dtype.element_ty), mask=n_mask)


@dataclasses.dataclass(frozen=True)
class W8A16Config:
    """Tile sizes and launch settings; ``split_k`` cuts K across programs (1 = no split).
    ``block_m == 1`` selects the single-row GEMV kernel (M must be 1; split_k unused)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


def default_config(m: int, n: int, k: int, sm_count: int) -> W8A16Config:
    """Small M (decode) is a weight stream: narrow N tiles give every SM programs without
    splitting K (a split costs two extra kernels); K is split only when N is too small for
    that. One row with N under ~16k runs the GEMV kernel (H200, graph replays: 1.3-1.6x the
    tiled kernel on the 8B shapes; the tiled one stays ahead on the 28672-wide gate_up).
    Large M (prefill) is compute bound: square tensor-core tiles."""
    if m == 1 and n < 128 * sm_count:
        if k >= 8192:
            return W8A16Config(1, 2, 2048, num_warps=4, num_stages=2)
        return W8A16Config(1, 4, 1024, num_warps=4, num_stages=2)
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
) -> torch.Tensor:  # [..., N] in x.dtype
    """Same semantics as ``kernels.reference.w8a16_linear``."""
    assert x.dtype in (torch.float32, torch.float16, torch.bfloat16), f"x {x.dtype}"
    assert qweight.dtype in (torch.int8, torch.float8_e4m3fn) and qweight.dim() == 2, (
        f"qweight {qweight.dtype} {tuple(qweight.shape)} must be a 2-D int8 / fp8 tensor"
    )
    n, k = qweight.shape
    assert x.shape[-1] == k, f"x {tuple(x.shape)} vs qweight {tuple(qweight.shape)}"
    assert scale.dtype == torch.float32 and scale.shape == (n,), (
        f"scale {scale.dtype} {tuple(scale.shape)} must be fp32 ({n},)"
    )
    assert scale.is_contiguous(), "scale must be contiguous"
    if bias is not None:
        assert bias.shape == (n,) and bias.is_contiguous(), f"bias {tuple(bias.shape)} vs ({n},)"
    assert x.device == qweight.device == scale.device, "x, qweight and scale on one device"
    x2 = x.reshape(-1, k)  # [M, K]
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out.view(*x.shape[:-1], n)
    cfg = config or default_config(m, n, k, num_sms(x.device))
    if cfg.block_m == 1:
        assert m == 1, f"the GEMV config takes one row, got {m}"
        assert qweight.stride(1) == 1, "the GEMV needs a K-contiguous weight"
        _w8_gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
            x2.contiguous(), qweight, scale, bias if bias is not None else scale, out, n, k,
            qweight.stride(0),
            BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, HAS_BIAS=bias is not None,
            EVEN=n % cfg.block_n == 0 and k % cfg.block_k == 0,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        return out.view(*x.shape[:-1], n)
    k_per_split = math.ceil(math.ceil(k / cfg.split_k) / cfg.block_k) * cfg.block_k
    split = math.ceil(k / k_per_split)  # rounding can leave fewer non-empty splits
    target = out if split == 1 else torch.empty((split, m, n), dtype=torch.float32,
                                                device=x.device)  # fmt: skip
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), split)
    _w8a16_kernel[grid](
        x2, qweight, scale, bias if bias is not None else scale, target,
        m, n, k, k_per_split,
        x2.stride(0), x2.stride(1), qweight.stride(0), qweight.stride(1),
        target.stride(0) if split > 1 else 0, target.stride(-2), target.stride(-1),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        HAS_BIAS=bias is not None, EVEN_K=k % k_per_split == 0, EVEN_N=n % cfg.block_n == 0,
        DOT_PRECISION=dot_precision(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
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
    block = triton.next_power_of_2(k)
    _fp8_quantize_rows_kernel[(m,)](
        x, q, scale, k, x.stride(0), q.stride(0),
        FP8_MAX=torch.finfo(torch.float8_e4m3fn).max, MIN_SCALE=1e-12, BLOCK_K=block,
        num_warps=min(max(block // 512, 1), 16),
    )  # fmt: skip
    return q, scale
