"""One row times a weight (GEMV, Triton): the batch-1 decode projections.

Weights are bf16 / fp16, or int8 / fp8 e4m3 with a per-channel scale (W8A16; the tiled
kernel and the dispatch live in ``kernels.quant_matmul``). Each program streams
``block_n`` weight rows (gated: and their up rows) along K as words of four weights, widens
them in registers (inline PTX for 8-bit weights on a GPU) and reduces once at the end.

At batch 1 a decoder layer is a chain of small kernels, so the GEMV also takes what sits
between its projections: the RMSNorm of its input (``norm``), the residual add after it
(``residual``) and the gated MLP's SiLU-and-mul (``gated``). A Llama layer is then five
kernels (qkv, attention, o, gate_up, down), each waiting in-kernel for the one before (PDL)
after requesting its first weight tiles.
"""

import dataclasses

import torch
import triton
import triton.language as tl

from kernels.launch import cdiv
from kernels.pdl import pdl_launch, wait_for_predecessor
from kernels.weight_words import (
    e4m3x4_word_to_f32,
    epilogue,
    halves_to_f32,
    i8x4_word_to_f32,
    word_byte_f32,
)


@triton.jit
def _dot_words(acc, words, x0, x1, x2, x3, W16: tl.constexpr, FP8: tl.constexpr,
               PTX_WIDEN: tl.constexpr):  # fmt: skip
    """acc += the four weights of each word times x0..x3 (x[4j .. 4j + 3], fp32)."""
    if W16 is not None:
        w0, w1, w2, w3 = halves_to_f32(words, W16)
    elif PTX_WIDEN and FP8:
        w0, w1, w2, w3 = e4m3x4_word_to_f32(words)
    elif PTX_WIDEN:
        w0, w1, w2, w3 = i8x4_word_to_f32(words)
    else:
        w0 = word_byte_f32(words, 0, FP8)
        w1 = word_byte_f32(words, 1, FP8)
        w2 = word_byte_f32(words, 2, FP8)
        w3 = word_byte_f32(words, 3, FP8)
    acc = tl.fma(w0, x0, acc)
    acc = tl.fma(w1, x1, acc)
    acc = tl.fma(w2, x2, acc)
    return tl.fma(w3, x3, acc)


@triton.jit
def _load_x4(ptrs, mask, EVEN: tl.constexpr, X16: tl.constexpr):
    """x[4j .. 4j + 3] as four fp32 tensors. X16: ``ptrs`` are int64 pointers to the four
    16-bit values (one load), else pointers to x[4j] (four strided loads)."""
    if X16 is not None:
        return halves_to_f32(tl.load(ptrs) if EVEN else tl.load(ptrs, mask=mask, other=0), X16)
    return (_load_x(ptrs, mask, EVEN), _load_x(ptrs + 1, mask, EVEN),
            _load_x(ptrs + 2, mask, EVEN), _load_x(ptrs + 3, mask, EVEN))  # fmt: skip


@triton.jit
def _load_x(ptrs, mask, EVEN: tl.constexpr):
    x = tl.load(ptrs) if EVEN else tl.load(ptrs, mask=mask, other=0.0)
    return x.to(tl.float32)


@triton.jit
def _load_words(ptrs, mask, EVEN: tl.constexpr):
    return tl.load(ptrs) if EVEN else tl.load(ptrs, mask=mask, other=0)


@triton.jit
def _gemv_kernel(
    x_ptr,  # [K] one dense row, fp32 / fp16 / bf16 (NORM: the residual stream, normed here)
    w_ptr,  # [N, K] int8 / fp8 e4m3 / fp16 / bf16, K % 4 == 0; GATED: [2N, K], gate then up rows
    scale_ptr,  # [N] fp32 (HAS_SCALE only; GATED: [2N])
    bias_ptr,  # [N] (HAS_BIAS only; GATED: [2N])
    norm_ptr,  # [K] RMSNorm weight, x's dtype (NORM only)
    res_ptr,  # [N] residual added to the output (RESIDUAL only)
    out_ptr,  # [N]
    N,
    K,
    stride_wn,  # in weights, a multiple of 4
    up_offset,  # GATED: N * stride_wn, where the up rows start
    eps,  # NORM only
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN: tl.constexpr,  # N % BLOCK_N == 0 and K % BLOCK_K == 0: no masks
    GATED: tl.constexpr,
    W16: tl.constexpr,  # the weight's dtype if fp16 / bf16, else None (int8 / fp8)
    FP8: tl.constexpr,
    PTX_WIDEN: tl.constexpr,  # widen 8-bit weights by byte permutes (GPU): int8 or e4m3
    PREFETCH: tl.constexpr,  # K tiles requested ahead of the one being multiplied (0-2)
    X16: tl.constexpr,  # x's dtype if bf16 / fp16 and 8-byte aligned (packed loads), else None
    NORM: tl.constexpr,
    RESIDUAL: tl.constexpr,
    PDL: tl.constexpr,
):
    """One row times the weight: each program streams BLOCK_N weight rows (GATED: and the
    matching up rows) along K and reduces once at the end; no tensor-core tile is padded out
    from a single row.

    The weight is read as words of four weights (int32 for 8-bit weights, int64 for 16-bit),
    [BLOCK_N, BLOCK_K / 4]: word j of a row holds k = 4j .. 4j + 3, widened to four fp32
    tensors that multiply four interleaved slices of x (L1 hits) into one accumulator a
    quarter of the tile's size, so registers go to bytes in flight. Plain loads are not
    software-pipelined by Triton, so the loop does it in registers: tile ``k + PREFETCH`` is
    requested before tile ``k`` is multiplied; near the end the requests repeat the last tile
    (cache hits) instead of masking (PREFETCH 0: the request after the last is masked off).
    The first tiles are requested before waiting on the previous kernel (weights never
    depend on it): with PDL the weight stream starts while that kernel still runs.

    NORM: x is RMS-normalised on the way: the loop multiplies the weights by x * g (g the
    norm weight) and sums x^2 from the same loads; 1 / rms(x) scales the sums at the end.
    Unlike the RMSNorm kernel, the normed x is not rounded to x's dtype (a prologue pass
    over x in every program cost up to 5 us on the 8B qkv). RESIDUAL: the output is
    ``residual + x @ W.T``, the product rounded to the output dtype before the add."""
    BLOCK_W: tl.constexpr = BLOCK_K // 4
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, BLOCK_W)
    n_mask = offs_n < N
    if W16 is not None:
        words = w_ptr.to(tl.pointer_type(tl.int64), bitcast=True)
    else:
        words = w_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    rows = words + offs_n[:, None].to(tl.int64) * (stride_wn // 4) + offs_w[None, :]
    up = up_offset // 4
    # The activations of every weight word, broadcast over the rows: each thread loads
    # exactly those its words multiply, in their layout (no shuffle through shared memory).
    if X16 is not None:
        x_cols = x_ptr.to(tl.pointer_type(tl.int64), bitcast=True) + offs_w[None, :]
        g_cols = norm_ptr.to(tl.pointer_type(tl.int64), bitcast=True) + offs_w[None, :]
    else:
        x_cols = x_ptr + 4 * offs_w[None, :]
        g_cols = norm_ptr + 4 * offs_w[None, :]
    x_cols += 0 * offs_n[:, None]
    g_cols += 0 * offs_n[:, None]
    x_step: tl.constexpr = 4 if X16 is None else 1  # x_cols advance per word
    last = (K - 1) // BLOCK_K * BLOCK_W  # first word of the last K tile
    w0, u0 = _load_tile(rows, up, 0, n_mask, offs_w, K, EVEN, GATED)
    if PREFETCH >= 2:
        w1, u1 = _load_tile(rows, up, tl.minimum(BLOCK_W, last), n_mask, offs_w, K, EVEN, GATED)
    wait_for_predecessor(PDL)
    acc = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
    sum_sq = tl.zeros((BLOCK_K,), dtype=tl.float32)  # NORM: x^2 along K, once per program
    offs_k = tl.arange(0, BLOCK_K)
    for j0 in range(0, K // 4, BLOCK_W):
        if PREFETCH >= 1:  # request tile j0 + PREFETCH now, multiply it later
            jn = tl.minimum(j0 + PREFETCH * BLOCK_W, last)
            wn, un = _load_tile(rows, up, jn, n_mask, offs_w, K, EVEN, GATED)
        x_mask = (4 * (j0 + offs_w) < K)[None, :]
        x0, x1, x2, x3 = _load_x4(x_cols + x_step * j0, x_mask, EVEN, X16)
        if NORM:  # x * g now, the common factor 1 / rms(x) after the loop
            ks = 4 * j0 + offs_k  # x again, as a plain vector: its squares once, not per row
            xk = tl.load(x_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)
            sum_sq = tl.fma(xk, xk, sum_sq)
            g0, g1, g2, g3 = _load_x4(g_cols + x_step * j0, x_mask, EVEN, X16)
            x0, x1, x2, x3 = x0 * g0, x1 * g1, x2 * g2, x3 * g3
        acc = _dot_words(acc, w0, x0, x1, x2, x3, W16, FP8, PTX_WIDEN)
        if GATED:
            acc_up = _dot_words(acc_up, u0, x0, x1, x2, x3, W16, FP8, PTX_WIDEN)
        if PREFETCH == 0:  # the next tile requested only after this one is multiplied
            w0, u0 = _load_tile(rows, up, j0 + BLOCK_W, n_mask, offs_w, K, False, GATED)
        elif PREFETCH == 1:
            w0, u0 = wn, un
        else:
            w0, u0, w1, u1 = w1, u1, wn, un
    out_dt = out_ptr.dtype.element_ty
    acc, acc_up = tl.sum(acc, axis=1), tl.sum(acc_up, axis=1)
    if NORM:
        inv_rms = tl.rsqrt(tl.sum(sum_sq, axis=0) / K + eps)
        acc, acc_up = acc * inv_rms, acc_up * inv_rms
    out = epilogue(acc, acc_up, scale_ptr, bias_ptr, offs_n, n_mask, N, 1.0, HAS_SCALE,
                    HAS_BIAS, GATED, out_dt)  # fmt: skip
    if RESIDUAL:
        res = tl.load(res_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        out = out.to(out_dt).to(tl.float32) + res
    tl.store(out_ptr + offs_n, out.to(out_dt), mask=n_mask)


@triton.jit
def _load_tile(rows, up, j, n_mask, offs_w, K, EVEN: tl.constexpr, GATED: tl.constexpr):
    """Words ``j + offs_w`` of the gate rows and (GATED) of the up rows ``up`` words on."""
    mask = n_mask[:, None] & (4 * (j + offs_w) < K)[None, :]
    w = _load_words(rows + j, mask, EVEN)
    return w, _load_words(rows + up + j, mask, EVEN) if GATED else w


def gemv_layout(weight: torch.Tensor) -> bool:
    """Whether the GEMV can read ``weight`` [N, K] (8- or 16-bit) as words of four weights."""
    return (
        weight.stride(1) == 1
        and weight.shape[1] % 4 == 0
        and weight.stride(0) % 4 == 0
        and weight.data_ptr() % (4 * weight.element_size()) == 0
    )


def _x16(x: torch.Tensor, norm_weight: torch.Tensor | None) -> tl.dtype | None:
    """The GEMV's X16: a dense bf16 / fp16 row at an 8-byte aligned address (and the norm
    weight, read the same way), else None."""
    if not x.is_contiguous() or x.data_ptr() % 8:
        return None
    if norm_weight is not None and norm_weight.data_ptr() % 8:
        return None
    return _W16.get(x.dtype)


_W16 = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def gemv(
    x: torch.Tensor,  # [1, K] fp32 / fp16 / bf16
    weight: torch.Tensor,  # [N, K] 8- or 16-bit (gated: [2N, K]), gemv_layout
    out: torch.Tensor,  # [1, N] (gated: N of the 2N rows)
    block_n: int,
    block_k: int,
    num_warps: int,
    *,
    prefetch: int,
    scale: torch.Tensor | None = None,  # [N] fp32 (gated: [2N]): 8-bit weights only
    bias: torch.Tensor | None = None,
    gated: bool = False,
    norm: tuple[torch.Tensor, float] | None = None,  # (RMSNorm weight [K], eps)
    residual: torch.Tensor | None = None,  # [1, N]
    ptx: bool = False,  # widen 8-bit weights by inline PTX (a GPU, never the interpreter)
) -> None:
    """Launches the GEMV into ``out``; callers check the inputs (``linear_one_row``,
    ``kernels.quant_matmul.w8a16_matmul``). A norm the kernel should not take
    (``norm_in_kernel``) runs as the RMSNorm kernel first."""
    n, k = out.shape[1], weight.shape[1]
    if norm is not None and not norm_in_kernel(k, gated):
        from kernels.rms_norm import rms_norm

        x, norm = rms_norm(x, norm[0], norm[1])[0], None
    xc = x.contiguous()
    norm_weight, eps = norm if norm is not None else (xc, 0.0)
    _gemv_kernel[(cdiv(n, block_n),)](
        xc, weight, scale if scale is not None else xc, bias if bias is not None else xc,
        norm_weight, residual if residual is not None else xc, out, n, k,
        weight.stride(0), n * weight.stride(0) if gated else 0, eps,
        BLOCK_N=block_n, BLOCK_K=block_k, HAS_SCALE=scale is not None,
        HAS_BIAS=bias is not None, EVEN=n % block_n == 0 and k % block_k == 0, GATED=gated,
        W16=_W16.get(weight.dtype), FP8=weight.dtype == torch.float8_e4m3fn, PTX_WIDEN=ptx,
        PREFETCH=prefetch, X16=_x16(xc, norm[0] if norm else None), NORM=norm is not None,
        RESIDUAL=residual is not None, num_warps=num_warps, num_stages=1,
        **pdl_launch(x.device),
    )  # fmt: skip


def norm_in_kernel(k: int, gated: bool) -> bool:
    """Whether the GEMV applies an RMSNorm itself. In-kernel, x * g is computed on every
    row of every tile: a gated layer with long rows turns ALU-bound (H200, Llama-3-8B
    gate_up: 65.0 us vs 60.8 with the norm kernel first, int8 40.1 vs 34.0), while qkv and
    the 1B gate_up gain from the launch saved (1B gate_up bf16 18.5 vs 21.3 us;
    ``benchmarks/gemv.py --cases fusions``). The norm kernel before the GEMV overlaps the
    GEMV's first weight requests under PDL."""
    return not (gated and k >= 4096)


@dataclasses.dataclass(frozen=True)
class GemvTiles:
    """The GEMV's launch: ``block_n`` rows per program, ``block_k`` weights per row per K
    tile (a power of 2, >= 4), ``prefetch`` K tiles in flight ahead (0-2)."""

    block_n: int
    block_k: int
    num_warps: int = 4
    prefetch: int = 2

    def __post_init__(self) -> None:
        assert self.block_k >= 4 and self.block_k & (self.block_k - 1) == 0, (
            f"block_k {self.block_k} must be a power of 2 >= 4 (words of four weights)"
        )
        assert 0 <= self.prefetch <= 2, f"prefetch {self.prefetch} must be 0, 1 or 2"


def default_tiles(n: int, k: int, gated: bool = False) -> GemvTiles:
    """16-bit weights, from an H200 sweep of the Llama-3.2-1B / 3-8B projections at batch 1
    (``benchmarks/gemv.py --cases tiles``): two rows per program, 1 KiB of each per K tile,
    2 KiB for long rows (down, K >= 8192) and wide outputs (LM head); gated layers
    (gate_up) four gate and four up rows, one K tile ahead."""
    if gated:
        return GemvTiles(4, 512, prefetch=1)
    return GemvTiles(2, 1024) if k >= 8192 or n >= 32768 else GemvTiles(2, 512)


def linear_one_row(
    x: torch.Tensor,  # [1, K] fp16 / bf16, the weight's dtype
    weight: torch.Tensor,  # [N, K] (gated: [2N, K]), gemv_layout
    bias: torch.Tensor | None = None,  # [N] (gated: [2N])
    *,
    gated: bool = False,
    norm: tuple[torch.Tensor, float] | None = None,  # (RMSNorm weight [K], eps) applied to x
    residual: torch.Tensor | None = None,  # [1, N] added to the output
    tiles: GemvTiles | None = None,
    out: torch.Tensor | None = None,  # [1, N] x's dtype, contiguous: written instead of new
) -> torch.Tensor:  # [1, N]
    """``residual + act(rms_norm(x) @ weight.T + bias)`` for one row of a 16-bit weight in
    one kernel, each part optional (act: ``silu(gate) * up`` when gated); rounds as the
    unfused kernels do (``kernels.reference.linear_one_row``), except that the normed x
    stays in fp32."""
    assert weight.dtype in _W16 and weight.dim() == 2, (
        f"weight {weight.dtype} {tuple(weight.shape)} must be a 2-D fp16 / bf16 tensor"
    )
    rows, k = weight.shape
    assert x.dim() == 2 and x.shape == (1, k), f"x {tuple(x.shape)} must be (1, {k})"
    assert x.dtype == weight.dtype, f"x {x.dtype} vs weight {weight.dtype}"
    assert gemv_layout(weight), (
        f"the GEMV reads words of four weights: it needs a K-contiguous weight, K % 4 == 0 and "
        f"8-byte aligned rows; got shape {tuple(weight.shape)}, stride {weight.stride()}"
    )
    assert not gated or rows % 2 == 0, f"gated needs [gate; up] rows, got {rows}"
    n = rows // 2 if gated else rows
    if bias is not None:
        assert bias.shape == (rows,) and bias.is_contiguous(), (
            f"bias {tuple(bias.shape)} vs ({rows},)"
        )
    check_fusions(x, n, norm, residual)
    if out is None:
        out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    assert out.shape == (1, n) and out.dtype == x.dtype and out.is_contiguous(), (
        f"out {out.dtype} {tuple(out.shape)} must be a contiguous {x.dtype} (1, {n})"
    )
    t = tiles or default_tiles(n, k, gated)
    gemv(x, weight, out, t.block_n, t.block_k, t.num_warps, prefetch=t.prefetch, bias=bias,
         gated=gated, norm=norm, residual=residual)  # fmt: skip
    return out


def check_fusions(
    x: torch.Tensor, n: int, norm: tuple[torch.Tensor, float] | None, residual: torch.Tensor | None
) -> None:
    """The GEMV's norm weight is [K] of x's dtype, its residual [1, N] of x's dtype."""
    k = x.shape[-1]
    if norm is not None:
        assert norm[0].shape == (k,) and norm[0].dtype == x.dtype and norm[0].is_contiguous(), (
            f"norm weight {norm[0].dtype} {tuple(norm[0].shape)} must be {x.dtype} ({k},)"
        )
    if residual is not None:
        assert residual.shape == (1, n) and residual.dtype == x.dtype, (
            f"residual {residual.dtype} {tuple(residual.shape)} must be {x.dtype} (1, {n})"
        )
        assert residual.is_contiguous(), "residual must be contiguous"
