"""Weight-only 4-bit matmul (W4A16, Triton): ``out = x @ dequant(q).T + bias`` with
group-wise asymmetric int4 weights, ``dequant(q)[n, k] = (q[n, k] - zero[n, g]) * scale[n, g]``
for the group ``g = k // group_size``.

Layout (``vllm_runner.model.layers.int4``): ``qweight`` [N, ceil(K / 8)] int32, nibble ``i``
(bits 4i..4i+3) of word ``j`` holding k = 8j + i; ``scale`` [N, num_groups] fp32; ``zero``
[N, num_groups] uint8. Output channels first, as float weights: the linear layers' loaders
shard and merge (q/k/v, gate/up) int4 tensors along dim 0 unchanged.

Three paths, by the number of rows M (H200, 8B shapes: ``benchmarks/int4_probe.py``):
- M <= ``GEMV_MAX_M`` (batch-1 decode): a GEMV on the CUDA cores. Each program streams a
  block of output channels' words; nibble i of every word (a [channels, words] tile) meets
  x at k = 8j + i (a strided load of x, which stays in cache), so no tile is reshaped; the
  zero point comes off once per group as zero * sum(x), and the group's scale multiplies
  the tile's fp32 sum. It reads 0.5 byte a weight (plus ~0.04 for scales and zeros at
  group 128), 1.3-1.6x faster than bf16 at one row; K is split across programs when N
  alone leaves the GPU short of programs. It converts each weight once per row, so from 2
  rows on the next path is faster (a layer at 2 rows: 107.7 vs 138.2 us). 16-bit x on a
  GPU with groups of multiples of 128 takes ``kernels.quant_int4_half2`` instead, the same
  sums in packed half precision (a layer 1.1x faster); this one takes fp32 x, other groups
  and the interpreter.
- M <= ``MMA_MAX_M`` (batched decode): ``kernels.quant_int4_mma``, each weight tile
  converted once and multiplied by up to 64 rows on tensor cores; its time is flat from 1
  to 16 rows (1.34-1.48x bf16's at 4-16 rows, ~1.0x at 32, 0.57-0.82x at 64, where the
  GEMV at 8 rows is 0.3-0.4x and the path below 0.4-0.6x).
- Larger M (prefill, large batches): compute bound, so the weight is dequantized tile by
  tile into a scratch [N, K] in x's dtype (a bandwidth-bound pass: read 0.5, write 2 bytes a
  weight) and multiplied by cuBLAS (from 128 rows faster than the tensor-core kernel).
"""

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.int4_words import (
    NIBBLES,
    W4A16Config,
    group_block_k,
    launch_split,
    load_words,
    nibble_as_float,
    store_or_combine,
)
from kernels.launch import cdiv, next_power_of_2
from kernels.pdl import wait_for_predecessor
from kernels.quant_int4_half2 import half2_applies, w4a16_gemv_half2
from kernels.quant_int4_mma import w4a16_mma

GEMV_MAX_M = 1  # rows up to which the GEMV runs (its math is M x the weight's, on CUDA cores)
MMA_MAX_M = 64  # rows up to which the tensor-core kernel runs (then dequantize + cuBLAS)


@triton.jit(do_not_specialize=["M"])  # the token count changes every step: no recompiles
def _w4a16_gemv_kernel(
    x_ptr,  # [M, K] fp32 / fp16 / bf16
    w_ptr,  # [N, ceil(K / 8)] int32, packed along K
    scale_ptr,  # [N, num_groups] fp32
    zero_ptr,  # [N, num_groups] uint8
    bias_ptr,  # [N] (HAS_BIAS only)
    out_ptr,  # [M, N]
    partial_ptr,  # [splits, M, N] fp32 (splits > 1 only)
    counter_ptr,  # [ceil(N / BLOCK_N)] int32 zeros, left zero (splits > 1 only)
    M,
    N,
    K,
    k_per_split,  # multiple of BLOCK_K
    group_size,  # multiple of BLOCK_K
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_sn,
    stride_sg,
    stride_zn,
    stride_zg,
    stride_om,
    stride_on,
    BLOCK_M: tl.constexpr,  # >= M, a power of 2
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,  # K split across programs (grid dim 1 > 1)
    PAIRS: tl.constexpr,  # 16-bit x: two nibbles a word-op as 128 + q (``_biased_pair``)
    PDL: tl.constexpr,
):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_word = tl.arange(0, BLOCK_K // 8)
    rows = tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    num_words = tl.cdiv(K, 8)
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    last = k_lo + (k_hi - 1 - k_lo) // BLOCK_K * BLOCK_K  # the split's last K tile
    # the first weight tile requested before waiting on the previous kernel (weights never
    # depend on it: with PDL the stream starts while it still runs); then each tile's
    # successor is requested before the tile is multiplied (Triton does not pipeline plain
    # loads): the loop's end requests the last tile again, a cache hit, instead of masking
    packed = load_words(w_rows, k_lo, offs_word, n_mask, num_words, stride_wk, False)
    wait_for_predecessor(PDL)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # one row: per-word sums, reduced across the tile's words once after the loop
    acc_words = tl.zeros((BLOCK_N, BLOCK_K // 8), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ahead = load_words(w_rows, tl.minimum(k0 + BLOCK_K, last), offs_word, n_mask,
                            num_words, stride_wk, False)  # fmt: skip
        g = k0 // group_size
        zero = tl.load(zero_ptr + offs_n * stride_zn + g * stride_zg, mask=n_mask, other=0)
        scale = tl.load(scale_ptr + offs_n * stride_sn + g * stride_sg, mask=n_mask, other=0.0)
        zero = zero.to(tl.float32) + (128.0 if PAIRS else 0.0)  # (PAIRS: q carries a bias)
        for r in tl.static_range(BLOCK_M):
            row_k_hi = tl.where(r < M, k_hi, 0)  # a padding row reads nothing
            # sum (q - zero) x = sum q x - zero sum x; nibble i of word j meets x[k0 + 8j + i]
            # (zeros past the split and K meet a last, partial word's nibbles)
            qx = tl.zeros((BLOCK_N, BLOCK_K // 8), dtype=tl.float32)
            xs = tl.zeros((BLOCK_K // 8,), dtype=tl.float32)
            if PAIRS:  # nibbles i and i + 4 of a word as 128 + q by three bit ops
                for i in tl.static_range(4):
                    ks = k0 + offs_word * 8 + i
                    xi = tl.load(x_ptr + r * stride_xm + ks * stride_xk, mask=ks < row_k_hi,
                                 other=0.0).to(tl.float32)  # fmt: skip
                    x4 = tl.load(x_ptr + r * stride_xm + (ks + 4) * stride_xk,
                                 mask=ks + 4 < row_k_hi, other=0.0).to(tl.float32)  # fmt: skip
                    lo, hi = _biased_pair(packed, i)
                    qx += lo * xi[None, :] + hi * x4[None, :]
                    xs += xi + x4
            else:
                for i in tl.static_range(8):
                    ks = k0 + offs_word * 8 + i
                    xi = tl.load(x_ptr + r * stride_xm + ks * stride_xk, mask=ks < row_k_hi,
                                 other=0.0).to(tl.float32)  # fmt: skip
                    qx += nibble_as_float(packed, i) * xi[None, :]
                    xs += xi
            if BLOCK_M == 1:
                acc_words += (qx - zero[:, None] * xs[None, :]) * scale[:, None]
            else:
                part = (tl.sum(qx, axis=1) - zero * tl.sum(xs, axis=0)) * scale
                acc += tl.where(rows[:, None] == r, part[None, :], 0.0)
        packed = ahead
    if BLOCK_M == 1:
        acc += tl.sum(acc_words, axis=1)[None, :]
    store_or_combine(acc, bias_ptr, out_ptr, partial_ptr, counter_ptr, pid_n, rows, offs_n, M,
                     N, stride_om, stride_on, HAS_BIAS, SPLIT)  # fmt: skip


@triton.jit
def _biased_pair(packed, i: tl.constexpr):
    """Nibbles i and i + 4 of each word as fp32 128 + q: OR-ed into the mantissas of a pair of
    bf16 128s (0x4300), each half widened by a shift or a mask (3 integer ops for 2 weights,
    ``nibble_as_float``'s 3 for 1). The bias comes off with the zero point, as 128 * sum(x):
    products of 16-bit x stay exact in fp32; the larger terms cost fp32 sums ~4 bits."""
    pair = ((packed >> (4 * i)) & 0x000F000F) | 0x43004300
    lo = (pair << 16).to(tl.float32, bitcast=True)
    hi = (pair & -65536).to(tl.float32, bitcast=True)
    return lo, hi


@triton.jit
def _int4_dequantize_kernel(
    w_ptr,  # [N, ceil(K / 8)] int32
    scale_ptr,  # [N, num_groups] fp32
    zero_ptr,  # [N, num_groups] uint8
    out_ptr,  # [N, K] in the activations' dtype
    N,
    K,
    group_size,  # multiple of BLOCK_K
    stride_wn,
    stride_wk,
    stride_sn,
    stride_sg,
    stride_zn,
    stride_zg,
    stride_on,
    stride_ok,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_word = pid_k * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
    n_mask = offs_n < N
    rows = offs_n.to(tl.int64)
    w_mask = n_mask[:, None] & (offs_word < tl.cdiv(K, 8))[None, :]
    packed = tl.load(w_ptr + rows[:, None] * stride_wn + offs_word[None, :] * stride_wk,
                     mask=w_mask, other=0)  # fmt: skip
    g = pid_k * BLOCK_K // group_size
    zero = tl.load(zero_ptr + offs_n * stride_zn + g * stride_zg, mask=n_mask, other=0)
    scale = tl.load(scale_ptr + offs_n * stride_sn + g * stride_sg, mask=n_mask, other=0.0)
    zero = zero.to(tl.float32)[:, None]
    scale = scale[:, None]
    dtype = out_ptr.dtype.element_ty
    n0 = (nibble_as_float(packed, 0) - zero) * scale  # [BLOCK_N, BLOCK_K / 8], exact q - zero
    n1 = (nibble_as_float(packed, 1) - zero) * scale
    n2 = (nibble_as_float(packed, 2) - zero) * scale
    n3 = (nibble_as_float(packed, 3) - zero) * scale
    n4 = (nibble_as_float(packed, 4) - zero) * scale
    n5 = (nibble_as_float(packed, 5) - zero) * scale
    n6 = (nibble_as_float(packed, 6) - zero) * scale
    n7 = (nibble_as_float(packed, 7) - zero) * scale
    # nibbles into K order (k = 8j + i): three rounds of pairwise interleaves
    low = tl.interleave(tl.interleave(n0, n4), tl.interleave(n2, n6))
    high = tl.interleave(tl.interleave(n1, n5), tl.interleave(n3, n7))
    w = tl.interleave(low, high).to(dtype)  # [BLOCK_N, BLOCK_K]
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    ptrs = out_ptr + rows[:, None] * stride_on + ks[None, :] * stride_ok
    tl.store(ptrs, w, mask=n_mask[:, None] & (ks < K)[None, :])


def default_config(m: int, k: int, group_size: int) -> W4A16Config:
    """The GEMV's: 64 channels a program at two warps, K tiles of a whole group of 128, and K
    split in 8, in 16 from 64 tiles (fewer for short K: at least 4 tiles a split). On an H200
    at one row (``benchmarks/int4_probe.py``, the 8B shapes, us, medians of two A/B rounds):
    13.6 / 9.5 / 44.0 / 26.5 (qkv / o / gate_up / down) with the next tile prefetched, 12.8 /
    11.2 / 43.9 / 32.0 without; bf16 ``F.linear`` 16.3 / 13.7 / 67.0 / 35.5. The down
    projection's K of 14,336 split in 16: 21.5 vs 25.5 us (one sweep, session 44).
    Any N of a real layer gives more programs than SMs this way."""
    block_k = group_block_k(group_size, 128)
    tiles = math.ceil(k / block_k)
    split = max(1, min(16 if tiles >= 64 else 8, tiles // 4))
    return W4A16Config(next_power_of_2(m), 64, block_k, split, num_warps=2)


def int4_dequantize(
    qweight: torch.Tensor,  # [N, ceil(K / 8)] int32
    scale: torch.Tensor,  # [N, ceil(K / group_size)] fp32
    zero: torch.Tensor,  # [N, ceil(K / group_size)] uint8
    group_size: int,
    k: int,
    dtype: torch.dtype,
) -> torch.Tensor:  # [N, K] in dtype
    """``kernels.reference.int4_dequantize`` rounded to ``dtype``, on the GPU in one pass."""
    n = qweight.shape[0]
    out = torch.empty((n, k), dtype=dtype, device=qweight.device)
    block_n, block_k = 32, group_block_k(group_size, 128)
    grid = (cdiv(n, block_n), cdiv(k, block_k))
    _int4_dequantize_kernel[grid](
        qweight, scale, zero, out, n, k, group_size,
        qweight.stride(0), qweight.stride(1), scale.stride(0), scale.stride(1),
        zero.stride(0), zero.stride(1), out.stride(0), out.stride(1),
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )  # fmt: skip
    return out


def w4a16_matmul(
    x: torch.Tensor,  # [..., K] fp32 / fp16 / bf16
    qweight: torch.Tensor,  # [N, ceil(K / 8)] int32
    scale: torch.Tensor,  # [N, ceil(K / group_size)] fp32
    zero: torch.Tensor,  # [N, ceil(K / group_size)] uint8, 0..15
    group_size: int,
    bias: torch.Tensor | None = None,  # [N]
    config: W4A16Config | None = None,  # the kernel's that the row count picks
) -> torch.Tensor:  # [..., N] in x.dtype
    """Same semantics as ``kernels.reference.w4a16_linear`` (up to fp32 summation order;
    rows past ``MMA_MAX_M``, and the tensor-core kernel's rows for groups of fewer than 128
    inputs, multiply the weight rounded to x's dtype, as a float layer would)."""
    assert x.dtype in (torch.float32, torch.float16, torch.bfloat16), f"x {x.dtype}"
    k = x.shape[-1]
    n = qweight.shape[0]
    groups = cdiv(k, group_size)
    assert qweight.dtype == torch.int32 and qweight.shape == (n, cdiv(k, NIBBLES)), (
        f"qweight {qweight.dtype} {tuple(qweight.shape)} must be int32 ({n}, {cdiv(k, 8)}) "
        f"for x {tuple(x.shape)}"
    )
    assert scale.dtype == torch.float32 and scale.shape == (n, groups), (
        f"scale {scale.dtype} {tuple(scale.shape)} must be fp32 ({n}, {groups})"
    )
    assert zero.dtype == torch.uint8 and zero.shape == (n, groups), (
        f"zero {zero.dtype} {tuple(zero.shape)} must be uint8 ({n}, {groups})"
    )
    assert group_size % 16 == 0, f"group_size {group_size} must be a multiple of 16"
    if bias is not None:
        assert bias.shape == (n,) and bias.is_contiguous(), f"bias {tuple(bias.shape)} vs ({n},)"
    assert x.device == qweight.device == scale.device == zero.device, "inputs on one device"
    x2 = x.reshape(-1, k)  # [M, K]
    m = x2.shape[0]
    if m == 0:
        return torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    if m > MMA_MAX_M:
        w = int4_dequantize(qweight, scale, zero, group_size, k, x.dtype)
        return F.linear(x, w, bias)
    kernel = w4a16_mma
    if m <= GEMV_MAX_M:  # 16-bit x on a GPU: the packed-half GEMV (inline PTX)
        kernel = w4a16_gemv_half2 if half2_applies(x, group_size) else w4a16_gemv
    out = kernel(x2, qweight, scale, zero, group_size, bias, config)
    return out.view(*x.shape[:-1], n)


def w4a16_gemv(
    x: torch.Tensor,  # [M, K] fp32 / fp16 / bf16
    qweight: torch.Tensor,  # [N, ceil(K / 8)] int32
    scale: torch.Tensor,  # [N, ceil(K / group_size)] fp32
    zero: torch.Tensor,  # [N, ceil(K / group_size)] uint8
    group_size: int,
    bias: torch.Tensor | None = None,  # [N]
    config: W4A16Config | None = None,
) -> torch.Tensor:  # [M, N] in x.dtype
    """The GEMV (inputs checked by ``w4a16_matmul``)."""
    m, k = x.shape
    cfg = config or default_config(m, k, group_size)
    assert cfg.block_m >= m, f"block_m {cfg.block_m} must cover the {m} rows"
    assert group_size % cfg.block_k == 0, (
        f"block_k {cfg.block_k} must divide group_size {group_size} (one scale per K tile)"
    )
    return launch_split(_w4a16_gemv_kernel, x, qweight, scale, zero, group_size, bias, cfg, 1,
                        PAIRS=x.dtype != torch.float32)  # fmt: skip
