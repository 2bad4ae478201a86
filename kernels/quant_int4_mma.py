"""W4A16 on tensor cores for a few rows (batched decode): ``out = x @ dequant(q).T + bias``
with the int4 layout of ``kernels.int4_words``.

The one-row GEMV (``kernels.quant_int4``) converts every weight once per row on the CUDA
cores, so its time grows with the rows (at 8 rows 0.3-0.5x a bf16 GEMM's speed, H200); the
path for many rows dequantizes the whole weight to x's dtype and calls cuBLAS, which moves
4.5 bytes a weight where bf16 moves 2. Here each weight tile is converted once per program
and multiplied on tensor cores by up to ``BLOCK_M`` rows, reading 0.5 byte a weight.

A program's K tile: the [channels, BLOCK_K / 8] words become [channels, BLOCK_K] weights in
K order (eight nibble planes, three rounds of register interleaves) and meet a contiguous
[rows, BLOCK_K] tile of x in one dot. (A first version dotted each nibble plane with a
strided load of x: its per-element loads grew with the rows, 2-6x slower than bf16.) A K
tile lies in one group when the group holds 128 inputs or a multiple (the usual GPTQ / AWQ
groups, and channel-wise ones of such K): the dot takes the exact small integers q - zero
and the group's scale multiplies the fp32 sum, as the GEMV does. Smaller groups change
scale inside a tile: there each weight is dequantized and rounded to x's dtype first, as
the cuBLAS path does. With 16-bit x and whole-tile groups on a GPU, ``MAGIC``'s PTX unpacks
two nibbles a 32-bit op (bias trick, exact): 1.02-1.36x the float conversion at 1-64 rows.

The words reach the unpack through Triton's software pipeline (cp.async copies into shared
memory, two K tiles ahead), and Triton reads them from there in the layout the mma operand
needs, so at 16-32 rows a program the unpacked tile never goes through shared memory (the
sm_90 compile test checks it). H200, 8B shapes, 8 rows: qkv / o / gate_up / down 12.0 /
9.1 / 43.4 / 23.8 us, bf16's 16.2 / 13.5 / 59.1 / 33.4 (a register prefetch of the words
and 128 channels a program, before: 17.3 / 13.3 / 74.9 / 34.1).
"""

import dataclasses

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from kernels.int4_words import (
    W4A16Config,
    launch_split,
    load_words,
    nibble_as_float,
    store_or_combine,
)
from kernels.launch import cdiv, shared_memory_bytes
from kernels.pdl import wait_for_predecessor

MMA_BLOCK_K = 128  # eight dots of 16 inputs: the least a 16-bit tensor-core dot takes


@triton.jit(do_not_specialize=["M"])  # the batch changes every step: no recompiles
def _w4a16_mma_kernel(
    x_ptr,  # [M, K] fp32 / fp16 / bf16
    w_ptr,  # [N, ceil(K / 8)] int32, packed along K
    scale_ptr,  # [N, num_groups] fp32
    zero_ptr,  # [N, num_groups] uint8
    bias_ptr,  # [N] (HAS_BIAS only)
    out_ptr,  # [M, N]
    partial_ptr,  # [splits, M, N] fp32 (splits > 1 only)
    counter_ptr,  # [row blocks * channel blocks] int32 zeros, left zero (splits > 1 only)
    M,
    N,
    K,
    k_per_split,  # multiple of BLOCK_K
    group_size,
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
    BLOCK_M: tl.constexpr,  # >= 16
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # 128
    GROUP_TILES: tl.constexpr,  # group_size % BLOCK_K == 0: one scale per K tile
    MAGIC: tl.constexpr,  # GROUP_TILES, 16-bit x on a GPU: the unpack's PTX (else None)
    NEG_BIAS: tl.constexpr,  # MAGIC: the 16-bit pattern of -(bias + zero) without the zero
    PRECISION: tl.constexpr,  # the dots': "ieee" for fp32 x (16-bit x: exact products)
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,  # K split across programs (grid dim 1 > 1)
    PDL: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no mask along the words (wider copies)
):
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_word = tl.arange(0, BLOCK_K // 8)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    num_words = tl.cdiv(K, 8)
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_xm
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    # weights never depend on the previous kernel, but here Triton's pipeliner requests them
    # (cp.async, two tiles ahead) and reads them from shared memory straight into the dot's
    # operand layout, which it carries back through the unpack (register prefetch before the
    # wait, as the GEMV does, kept the unpacked tile's round trip through shared memory:
    # 1.1-1.5x slower at 4-32 rows, H200)
    wait_for_predecessor(PDL)
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        packed = load_words(w_rows, k0, offs_word, n_mask, num_words, stride_wk, EVEN_K)
        if GROUP_TILES:  # one scale and zero per channel for the whole tile
            g = k0 // group_size
            zero = tl.load(zero_ptr + offs_n * stride_zn + g * stride_zg, mask=n_mask, other=0)
            scale = tl.load(scale_ptr + offs_n * stride_sn + g * stride_sg, mask=n_mask,
                            other=0.0)  # fmt: skip
            if MAGIC is not None:  # -(bias + zero) in both halves of a 32-bit word
                neg = (zero.to(tl.int32) | NEG_BIAS)[:, None]
                zero = tl.broadcast_to(neg | (neg << 16), packed.shape)
            else:
                zero = zero.to(tl.float32)[:, None]
        else:  # each word's group (a word never straddles one: groups are multiples of 16)
            g = (k0 + 8 * offs_word[None, :]) // group_size
            g_mask = n_mask[:, None] & (g < tl.cdiv(K, group_size))
            zero = tl.load(zero_ptr + offs_n[:, None] * stride_zn + g * stride_zg, mask=g_mask,
                           other=0).to(tl.float32)  # fmt: skip
            scale = tl.load(scale_ptr + offs_n[:, None] * stride_sn + g * stride_sg,
                            mask=g_mask, other=0.0)  # fmt: skip
        ks = k0 + tl.arange(0, BLOCK_K)  # (x is zero past the split and K: padding nibbles)
        x = tl.load(x_rows + ks[None, :] * stride_xk,
                    mask=(rows < M)[:, None] & (ks < k_hi)[None, :], other=0.0)  # fmt: skip
        if MAGIC is not None:
            w = _unpack_magic(packed, zero, MAGIC, dtype)  # [BLOCK_N, BLOCK_K]
        else:
            w = _unpack(packed, zero, scale, GROUP_TILES, dtype)
        part = tl.dot(x, tl.trans(w), input_precision=PRECISION)
        if GROUP_TILES:
            acc += part * scale[None, :]
        else:
            acc += part
    tile = pid_m * tl.num_programs(0) + pid_n
    store_or_combine(acc, bias_ptr, out_ptr, partial_ptr, counter_ptr, tile, rows, offs_n, M,
                     N, stride_om, stride_on, HAS_BIAS, SPLIT)  # fmt: skip


@triton.jit
def _unpack(packed, zero, scale, GROUP_TILES: tl.constexpr, dtype: tl.constexpr):
    """The tile's [channels, BLOCK_K / 8] words as [channels, BLOCK_K] weights in K order,
    in x's dtype: q - zero (exact) or, without GROUP_TILES, (q - zero) * scale rounded."""
    n0 = _nibble(packed, 0, zero, scale, GROUP_TILES, dtype)
    n1 = _nibble(packed, 1, zero, scale, GROUP_TILES, dtype)
    n2 = _nibble(packed, 2, zero, scale, GROUP_TILES, dtype)
    n3 = _nibble(packed, 3, zero, scale, GROUP_TILES, dtype)
    n4 = _nibble(packed, 4, zero, scale, GROUP_TILES, dtype)
    n5 = _nibble(packed, 5, zero, scale, GROUP_TILES, dtype)
    n6 = _nibble(packed, 6, zero, scale, GROUP_TILES, dtype)
    n7 = _nibble(packed, 7, zero, scale, GROUP_TILES, dtype)
    # k = 8j + i: three rounds of pairwise interleaves put nibble i of word j at 8j + i
    low = tl.interleave(tl.interleave(n0, n4), tl.interleave(n2, n6))
    high = tl.interleave(tl.interleave(n1, n5), tl.interleave(n3, n7))
    return tl.interleave(low, high)


@triton.jit
def _unpack_magic(packed, neg_bias, MAGIC: tl.constexpr, dtype: tl.constexpr):
    """``_unpack`` of a group tile for 16-bit x by ``MAGIC``'s PTX: two nibbles of a word a
    32-bit op (``_magic_pairs``), q - zero exact, then the same interleaves into K order."""
    n0, n4 = _magic_pairs(packed, neg_bias, MAGIC, dtype)
    n1, n5 = _magic_pairs(packed >> 4, neg_bias, MAGIC, dtype)
    n2, n6 = _magic_pairs(packed >> 8, neg_bias, MAGIC, dtype)
    n3, n7 = _magic_pairs(packed >> 12, neg_bias, MAGIC, dtype)
    low = tl.interleave(tl.interleave(n0, n4), tl.interleave(n2, n6))
    high = tl.interleave(tl.interleave(n1, n5), tl.interleave(n3, n7))
    return tl.interleave(low, high)


@triton.jit
def _magic_pairs(words, neg_bias, MAGIC: tl.constexpr, dtype: tl.constexpr):
    """(nibble 0, nibble 4) of each word as 16-bit q - zero."""
    if dtype == tl.bfloat16:
        out = tl.inline_asm_elementwise(MAGIC, "=r,=r,r,r,r,r", [words, neg_bias],
                                        dtype=(tl.bfloat16, tl.bfloat16), is_pure=True,
                                        pack=2)  # fmt: skip
    else:
        out = tl.inline_asm_elementwise(MAGIC, "=r,=r,r,r,r,r", [words, neg_bias],
                                        dtype=(tl.float16, tl.float16), is_pure=True,
                                        pack=2)  # fmt: skip
    return out


@triton.jit
def _nibble(packed, i: tl.constexpr, zero, scale, GROUP_TILES: tl.constexpr, dtype: tl.constexpr):
    w = nibble_as_float(packed, i) - zero
    if not GROUP_TILES:
        w = w * scale
    return w.to(dtype)


# Nibbles 0 and 4 of a word (bits 0-3, 16-19) OR-ed into the mantissas of a 16-bit pair
# whose value is a power-of-2 bias (bf16 128: 0x4300, fp16 1024: 0x6400) are bias + q
# exactly; one fma adds -(bias + zero): q - zero, exact (Marlin's trick; sm_80+). Two words
# a call (pack 2): the pairs regrouped by nibble with byte permutes.
_MAGIC = """{
    .reg .b32 t0, t1, one;
    mov.b32 one, ONE;
    lop3.b32 t0, $2, 0x000F000F, BIAS, 0xea;
    lop3.b32 t1, $3, 0x000F000F, BIAS, 0xea;
    fma.rn.TYPE t0, t0, one, $4;
    fma.rn.TYPE t1, t1, one, $5;
    prmt.b32 $0, t0, t1, 0x5410;
    prmt.b32 $1, t0, t1, 0x7632;
}"""
MAGIC = {  # x's dtype: (the PTX, -bias's 16-bit pattern)
    torch.bfloat16: (
        _MAGIC.replace("TYPE", "bf16x2").replace("BIAS", "0x43004300").replace("ONE", "0x3F803F80"),
        0xC300,
    ),
    torch.float16: (
        _MAGIC.replace("TYPE", "f16x2").replace("BIAS", "0x64006400").replace("ONE", "0x3C003C00"),
        0xE400,
    ),
}


def ptx_unpack(device: torch.device) -> bool:
    """Whether the kernel may unpack by ``MAGIC``'s PTX (a GPU; not the interpreter)."""
    return device.type == "cuda"


def default_mma_config(m: int, n: int, k: int, group_size: int) -> W4A16Config:
    """16-64 rows a program (as many as there are, padded; at most 32 for groups that are not
    whole K tiles, whose 64-row wgmma Triton 3.6 fails to compile: "Illegal shared layout"),
    128 channels at four warps (64 at 16 rows), three pipeline stages; K split so that
    programs of 128 channels would about fill an H200's 132 SMs twice, one split fewer where
    that cuts K's tiles evenly; at least 4 K tiles a split. From H200 sweeps of the 8B
    shapes (``benchmarks/int4_probe.py --sweep mma``, us): at 16 rows before the pipelined
    words, qkv 19.7 with 6 splits (4: 23.6, 8: 23.1), down 40.5 with 8 x 14 tiles (9: 51.9,
    4: 52.1), gate_up 80-86 at 1-8 splits; pipelined, at 8 rows qkv / o / gate_up / down
    12.1 / 9.2 / 44.0 / 24.3 with 64 channels, 16.1 / 12.7 / 49.3 / 30.9 with 128 (at 32-64
    rows 64 won only on o); two stages within 4% of three at 8-32 rows (gate_up 10% slower
    at 64), four and five slower."""
    block_m = min(64 if group_size % MMA_BLOCK_K == 0 else 32, max(16, 1 << (m - 1).bit_length()))
    programs = cdiv(n, 128) * cdiv(m, block_m)  # (the split as for 128 channels a program)
    tiles = cdiv(k, MMA_BLOCK_K)
    split = cdiv(264, programs)
    if tiles % split and split > 1 and tiles % (split - 1) == 0:
        split -= 1
    split = max(1, min(tiles // 4, split))
    return W4A16Config(block_m, 64 if block_m == 16 else 128, MMA_BLOCK_K, split, num_warps=4)


def smaller_configs(cfg: W4A16Config) -> list[W4A16Config]:
    """``cfg``, then half the rows a program down to 16, then fewer pipeline stages: what a
    card with less shared memory than an H100's gets (fp32 x takes 96-144 KiB at three
    stages, more than the 99 KiB of RTX 30 / 40, A10, L4, L40S; 16-bit x at most 96)."""
    out = [cfg]
    while out[-1].block_m > 16:
        out.append(dataclasses.replace(out[-1], block_m=out[-1].block_m // 2))
    while out[-1].num_stages > 1:
        out.append(dataclasses.replace(out[-1], num_stages=out[-1].num_stages - 1))
    return out


# programs the card refused to launch, by what their compile depends on (device, x dtype, the
# tile without its K split, group tiles, the PTX unpack, K a multiple of the tile), with
# Triton's refusal (what they took, the card's limit)
_UNFIT: dict[tuple, OutOfResources] = {}
# the tile each default launches as, once found (a dict lookup per call instead of the walk)
_FITTED: dict[tuple, W4A16Config] = {}


def w4a16_mma(
    x: torch.Tensor,  # [M, K] fp32 / fp16 / bf16
    qweight: torch.Tensor,  # [N, ceil(K / 8)] int32
    scale: torch.Tensor,  # [N, ceil(K / group_size)] fp32
    zero: torch.Tensor,  # [N, ceil(K / group_size)] uint8
    group_size: int,  # a multiple of 16
    bias: torch.Tensor | None = None,  # [N]
    config: W4A16Config | None = None,
    magic: bool | None = None,  # the PTX unpack (None: wherever it applies; False: A/B)
) -> torch.Tensor:  # [M, N] in x.dtype
    """The tensor-core kernel (inputs checked by ``kernels.quant_int4.w4a16_matmul``)."""
    m, k = x.shape
    n = qweight.shape[0]
    cfg = config or default_mma_config(m, n, k, group_size)
    assert cfg.block_m >= 16 and cfg.block_k == MMA_BLOCK_K, (
        f"the tensor-core kernel takes block_m >= 16 and block_k {MMA_BLOCK_K}, got {cfg}"
    )
    group_tiles = group_size % cfg.block_k == 0
    fits = ptx_unpack(x.device) and x.dtype in MAGIC and group_tiles
    assert fits or not magic, (
        f"magic=True: the PTX unpack needs 16-bit x on a GPU and groups of multiples of "
        f"{cfg.block_k}, got x {x.dtype} on {x.device.type}, group_size {group_size}"
    )
    asm, neg_bias = MAGIC[x.dtype] if fits and magic is not False else (None, 0)

    def launch(c: W4A16Config) -> torch.Tensor:
        return launch_split(
            _w4a16_mma_kernel, x, qweight, scale, zero, group_size, bias, c, cdiv(m, c.block_m),
            GROUP_TILES=group_tiles, MAGIC=asm, NEG_BIAS=neg_bias, EVEN_K=k % c.block_k == 0,
            PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        )  # fmt: skip

    if config is not None:
        return launch(config)
    # the default steps down where the card's shared memory is short (Triton refuses the
    # launch before anything runs; the refusal is remembered, so a CUDA graph's capture only
    # ever sees the launch that fits)
    start = (x.device, x.dtype, cfg, group_tiles, asm is not None, k % cfg.block_k == 0)
    fitted = _FITTED.get(start)
    if fitted is not None:
        return launch(fitted)
    refused = None
    for c in smaller_configs(cfg):
        key = (x.device, x.dtype, dataclasses.replace(c, split_k=1), group_tiles,
               asm is not None, k % c.block_k == 0)  # fmt: skip
        if key not in _UNFIT:
            try:
                out = launch(c)
            except OutOfResources as err:
                _UNFIT[key] = err
            else:
                _FITTED[start] = c
                return out
        refused = _UNFIT[key]
    raise RuntimeError(
        f"no int4 tensor-core tile down from {cfg} fits {x.device} (shared memory a program "
        f"may take: {shared_memory_bytes(x.device)} bytes); the last, {c}: {refused}"
    ) from refused
