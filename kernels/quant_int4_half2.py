"""The one-row W4A16 GEMV in packed half precision, for 16-bit x on a GPU (the layout and
semantics of ``kernels.quant_int4``; groups of multiples of 128 inputs).

The fp32 GEMV (``kernels.quant_int4``) spends ~6 instructions a weight (sm_90 SASS of the 8B
gate_up: 768 a K tile and thread of 128 weights). Here an inline-PTX block (``_PTX``) takes
a word (8 weights) in 13 instructions: one shift and four ``lop3`` OR the nibble pairs (0, 4),
(1, 5), (2, 6), (3, 7) into fp16 halves of 1024 + q (bits 0-3 of a half) or 1024 + 16 q
(bits 4-7), an add or fma a pair makes them q - zero exactly, four ``fma.f16x2`` multiply
them by x's matching pairs into an fp16 pair, whose halves widen to fp32 for the group's
scale. A program reads 16 channels x 512 inputs a K tile (256 contiguous bytes a channel,
the fp32 GEMV's 64), a group's scale and zero per 128-input sub-tile.

H200, 8B shapes at one row (``benchmarks/int4_probe.py``): qkv / o / gate_up / down 10.6-10.9
/ 8.3-8.8 / 34.7-36.4 / 18.2 us vs the fp32 GEMV's 12.0 / 9.0 / 39.3-39.7 / 21.3. Both read
DRAM at ~35-45% of its bandwidth: half the instructions did not make this kernel
bandwidth-bound (ncu: 25% occupancy, stalls on load latency).

fp16 sums need x in range: each program scales its K range of x by a power of two (exact)
so that its largest magnitude lies in [64, 128), where a word's sum (4 products a half,
|q - zero| <= 15) stays under 7,680, far from fp16's 65,504; the scale carries the inverse
power. Products round to fp16's 11 bits, so a sum's error is ~2**-11 of its terms'
magnitudes, under the 16-bit output's own rounding (2**-8 for bf16); values under 2**-21
of the range's largest fall to fp16 subnormals.
"""

import math

import torch
import triton
import triton.language as tl

from kernels.int4_words import (
    W4A16Config,
    launch_split,
    split_k_launch,
    store_or_combine,
)
from kernels.launch import next_power_of_2
from kernels.pdl import wait_for_predecessor


def _word_ptx(word: str, xs: tuple[str, str, str, str]) -> str:
    """One word's 8 products with x's pairs ``xs`` (nibble pairs (i, i + 4), i = 0..3) into
    the fp16 pair ``acc``: bits 0-3 of each half as 1024 + q, bits 4-7 as 1024 + 16 q."""
    return f"""
    shr.u32 w8, {word}, 8;
    lop3.b32 l0, {word}, 0x000F000F, 0x64006400, 0xea;
    lop3.b32 h0, {word}, 0x00F000F0, 0x64006400, 0xea;
    lop3.b32 l1, w8, 0x000F000F, 0x64006400, 0xea;
    lop3.b32 h1, w8, 0x00F000F0, 0x64006400, 0xea;
    add.rn.f16x2 l0, l0, $6;
    fma.rn.f16x2 h0, h0, sixteenth, $7;
    add.rn.f16x2 l1, l1, $6;
    fma.rn.f16x2 h1, h1, sixteenth, $7;
    mul.rn.f16x2 acc, l0, {xs[0]};
    fma.rn.f16x2 acc, h0, {xs[1]}, acc;
    fma.rn.f16x2 acc, l1, {xs[2]}, acc;
    fma.rn.f16x2 acc, h1, {xs[3]}, acc;"""


# $0 = fp32 sum of the 8 products of word $1 (nibble i at k = 8j + i) with x's fp16 pairs
# (x[8j + i], x[8j + i + 4]) for i = 0..3: $2-$5; $6 = -(1024 + zero), $7 = -(64 + zero) as
# fp16 pairs.
_PTX = tl.constexpr(
    """{
    .reg .b32 w8, l0, h0, l1, h1, acc, sixteenth;
    .reg .b16 s0, s1;
    .reg .f32 f0, f1;
    mov.b32 sixteenth, 0x2C002C00;"""
    + _word_ptx("$1", ("$2", "$3", "$4", "$5"))
    + """
    mov.b32 {s0, s1}, acc;
    cvt.f32.f16 f0, s0;
    cvt.f32.f16 f1, s1;
    add.f32 $0, f0, f1;
}"""
)


@triton.jit(do_not_specialize=["M"])
def _w4a16_gemv_half2_kernel(
    x_ptr,  # [1, K] fp16 / bf16
    w_ptr,  # [N, ceil(K / 8)] int32, packed along K
    scale_ptr,  # [N, num_groups] fp32
    zero_ptr,  # [N, num_groups] uint8
    bias_ptr,  # [N] (HAS_BIAS only)
    out_ptr,  # [1, N]
    partial_ptr,  # [splits, 1, N] fp32 (splits > 1 only)
    counter_ptr,  # [ceil(N / BLOCK_N)] int32 zeros, left zero (splits > 1 only)
    M,
    N,
    K,
    k_per_split,  # multiple of BLOCK_K
    group_size,  # multiple of 128 (a sub-tile lies in one group)
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
    BLOCK_M: tl.constexpr,  # 1
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    PDL: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no masks along K
    SPLIT_PAD: tl.constexpr,  # next power of 2 >= k_per_split
):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    SUB: tl.constexpr = BLOCK_K // 128  # sub-tiles of 128 inputs (16 words), a group each
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    num_words = tl.cdiv(K, 8)
    subs = tl.arange(0, SUB)
    words16 = tl.arange(0, 16)
    word_offs = subs[:, None] * 16 + words16[None, :]  # [SUB, 16] words of a tile
    w_rows = w_ptr + offs_n[:, None, None].to(tl.int64) * stride_wn
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    last = k_lo + (k_hi - 1 - k_lo) // BLOCK_K * BLOCK_K
    packed = _load_tile(w_rows, k_lo, word_offs, n_mask, num_words, stride_wk, EVEN_K)
    wait_for_predecessor(PDL)
    # the power of two that puts max |x| of this split in [64, 128) (fp32 exponents)
    CHUNK: tl.constexpr = min(SPLIT_PAD, 2048)
    x_max = 0.0
    for c0 in range(k_lo, k_hi, CHUNK):  # (chunks of at most 2,048: few registers)
        ks = c0 + tl.arange(0, CHUNK)
        xs = tl.load(x_ptr + ks * stride_xk, mask=ks < k_hi, other=0.0).to(tl.float32)
        x_max = tl.maximum(x_max, tl.max(tl.abs(xs), axis=0))
    exp = (x_max.to(tl.int32, bitcast=True) >> 23) & 0xFF
    up = tl.minimum(tl.maximum(260 - exp, 2), 253)  # biased exponent of the factor
    factor = (up << 23).to(tl.float32, bitcast=True)
    inverse = ((254 - up) << 23).to(tl.float32, bitcast=True)
    acc = tl.zeros((BLOCK_N, SUB, 16), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ahead = _load_tile(w_rows, tl.minimum(k0 + BLOCK_K, last), word_offs, n_mask,
                           num_words, stride_wk, EVEN_K)  # fmt: skip
        g = (k0 + subs * 128) // group_size  # each sub-tile's group
        g_mask = n_mask[:, None] & (g < tl.cdiv(K, group_size))[None, :]
        zero = tl.load(zero_ptr + offs_n[:, None] * stride_zn + g[None, :] * stride_zg,
                       mask=g_mask, other=0)  # fmt: skip
        scale = tl.load(scale_ptr + offs_n[:, None] * stride_sn + g[None, :] * stride_sg,
                        mask=g_mask, other=0.0)  # fmt: skip
        z = zero.to(tl.int32)
        lo_bias = 0xE400 | z  # fp16 -(1024 + zero)
        hi_bias = 0xD400 | (z << 4)  # fp16 -(64 + zero)
        lo_bias = (lo_bias | (lo_bias << 16))[:, :, None]
        hi_bias = (hi_bias | (hi_bias << 16))[:, :, None]
        base = k0 + word_offs * 8  # each word's first input
        x0 = _x_pair(x_ptr, base, 0, k_hi, stride_xk, factor, EVEN_K)[None, :, :]
        x1 = _x_pair(x_ptr, base, 1, k_hi, stride_xk, factor, EVEN_K)[None, :, :]
        x2 = _x_pair(x_ptr, base, 2, k_hi, stride_xk, factor, EVEN_K)[None, :, :]
        x3 = _x_pair(x_ptr, base, 3, k_hi, stride_xk, factor, EVEN_K)[None, :, :]
        sums = tl.inline_asm_elementwise(
            _PTX, "=r,r,r,r,r,r,r,r", [packed, x0, x1, x2, x3, lo_bias, hi_bias],
            dtype=tl.float32, is_pure=True, pack=1,
        )  # fmt: skip
        acc += sums * (scale * inverse)[:, :, None]
        packed = ahead
    acc2 = tl.sum(acc, axis=2)
    store_or_combine(tl.sum(acc2, axis=1)[None, :], bias_ptr, out_ptr, partial_ptr, counter_ptr,
                     pid_n, tl.arange(0, 1), offs_n, 1, N, stride_om, stride_on, HAS_BIAS,
                     SPLIT)  # fmt: skip


@triton.jit
def _load_tile(w_rows, k0, word_offs, n_mask, num_words, stride_wk, EVEN_K: tl.constexpr):
    """The [channels, sub-tiles, 16] words of the K tile at ``k0``."""
    words = k0 // 8 + word_offs
    if EVEN_K:
        mask = n_mask[:, None, None]
    else:
        mask = n_mask[:, None, None] & (words < num_words)[None, :, :]
    return tl.load(w_rows + words[None, :, :] * stride_wk, mask=mask, other=0)


@triton.jit
def _x_pair(x_ptr, base, i: tl.constexpr, k_hi, stride_xk, factor, EVEN_K: tl.constexpr):
    """fp16 pair (x[base + i], x[base + i + 4]) * factor as one 32-bit word (zero past the
    split: the padding nibbles meet zeros)."""
    if EVEN_K:
        lo = tl.load(x_ptr + (base + i) * stride_xk)
        hi = tl.load(x_ptr + (base + i + 4) * stride_xk)
    else:
        lo = tl.load(x_ptr + (base + i) * stride_xk, mask=base + i < k_hi, other=0.0)
        hi = tl.load(x_ptr + (base + i + 4) * stride_xk, mask=base + i + 4 < k_hi, other=0.0)
    return tl.inline_asm_elementwise(
        "cvt.rn.f16x2.f32 $0, $2, $1;", "=r,r,r",
        [lo.to(tl.float32) * factor, hi.to(tl.float32) * factor],
        dtype=tl.int32, is_pure=True, pack=1,
    )  # fmt: skip


def half2_applies(x: torch.Tensor, group_size: int) -> bool:
    """Whether one row of ``x`` goes to this GEMV: 16-bit on a GPU (inline PTX), groups of
    whole 128-input sub-tiles."""
    return (
        x.device.type == "cuda"
        and x.dtype in (torch.float16, torch.bfloat16)
        and group_size % 128 == 0
    )


def half2_config(k: int) -> W4A16Config:
    """16 channels a program, K tiles of 512 at two warps, K split in two where that leaves
    at least 4 tiles a split, in four from 24 tiles: from H200 sweeps of the 8B shapes at
    one row (``benchmarks/int4_probe.py --m 1 --sweep half2``; the down projection, K
    14,336: 18.2 us split in four, 23.5 in two, the fp32 GEMV's 21.3)."""
    tiles = math.ceil(k / 512)
    return W4A16Config(1, 16, 512, 4 if tiles >= 24 else 2 if tiles >= 8 else 1, num_warps=2)


def w4a16_gemv_half2(
    x: torch.Tensor,  # [1, K] fp16 / bf16, on a GPU
    qweight: torch.Tensor,  # [N, ceil(K / 8)] int32
    scale: torch.Tensor,  # [N, ceil(K / group_size)] fp32
    zero: torch.Tensor,  # [N, ceil(K / group_size)] uint8
    group_size: int,  # a multiple of 128
    bias: torch.Tensor | None = None,  # [N]
    config: W4A16Config | None = None,
) -> torch.Tensor:  # [1, N] in x.dtype
    """The packed-half GEMV (inputs checked by ``kernels.quant_int4.w4a16_matmul``)."""
    m, k = x.shape
    assert m == 1 and x.dtype in (torch.float16, torch.bfloat16), (
        f"the half2 GEMV takes one 16-bit row, got x {x.dtype} {tuple(x.shape)}"
    )
    assert group_size % 128 == 0, f"group_size {group_size} must be a multiple of 128"
    cfg = config or half2_config(k)
    assert cfg.block_k % 128 == 0, f"block_k {cfg.block_k} must be a multiple of 128"
    k_per_split = split_k_launch(k, cfg.block_k, cfg.split_k)[0]
    return launch_split(_w4a16_gemv_half2_kernel, x, qweight, scale, zero, group_size, bias,
                        cfg, 1, EVEN_K=k % cfg.block_k == 0,
                        SPLIT_PAD=next_power_of_2(k_per_split))  # fmt: skip
