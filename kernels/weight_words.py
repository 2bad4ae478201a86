"""Weights widened to fp32 in registers, and the projection epilogue (per-channel scale,
bias, SiLU-and-mul): the parts the one-row GEMV (``kernels.gemv``) and the tiled W8A16 matmul
(``kernels.quant_matmul``) share. 8-bit weights arrive as words of four (int8 or fp8 e4m3),
16-bit ones as int64 words of four halves; the inline-PTX widenings run on a GPU only.
"""

import triton
import triton.language as tl

# 4 int8 (one 32-bit register) -> 4 fp32 without the quarter-rate integer-to-float
# conversion: byte permutes and one subtraction each. A byte b (biased by +128) placed under
# the exponent of 2^23 reads as 2^23 + b; subtracting 2^23 + 128 is exact. The GEMV widens
# words with it, the tiled kernel tiles (i8x4_tile_to_f32).
I8X4_ASM: tl.constexpr = tl.constexpr(
    """{
    .reg .b32 u, m, t0, t1, t2, t3;
    mov.b32 m, 0x4B000000;
    xor.b32 u, $4, 0x80808080;
    prmt.b32 t0, u, m, 0x7650;
    prmt.b32 t1, u, m, 0x7651;
    prmt.b32 t2, u, m, 0x7652;
    prmt.b32 t3, u, m, 0x7653;
    sub.f32 $0, t0, 0f4B000080;
    sub.f32 $1, t1, 0f4B000080;
    sub.f32 $2, t2, 0f4B000080;
    sub.f32 $3, t3, 0f4B000080;
    }"""
)


@triton.jit
def epilogue(acc, acc_up, scale_ptr, bias_ptr, offs_n, n_mask, N, add_bias,
             HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, GATED: tl.constexpr,
             OUT_DTYPE: tl.constexpr):  # fmt: skip
    """Per-channel scale (HAS_SCALE) + bias (where ``add_bias``) of fp32 accumulators whose
    last dim is ``offs_n``; GATED: ``silu(gate) * up`` with each factor rounded to OUT_DTYPE
    first, as the unfused matmul output followed by ``silu_and_mul`` rounds it."""
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32) * add_bias
    if GATED:
        up = acc_up
        if HAS_SCALE:
            up = up * tl.load(scale_ptr + N + offs_n, mask=n_mask, other=0.0)
        if HAS_BIAS:
            up += tl.load(bias_ptr + N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        gate = acc.to(OUT_DTYPE).to(tl.float32)
        act = (gate * tl.sigmoid(gate)).to(OUT_DTYPE).to(tl.float32)
        acc = act * up.to(OUT_DTYPE).to(tl.float32)
    return acc


@triton.jit
def i8x4_word_to_f32(words):
    """Four fp32 tensors, bytes 0..3 (k = 4j .. 4j + 3) of each int8x4 word (I8X4_ASM)."""
    return _asm_word_to_4xf32(I8X4_ASM, words)


@triton.jit
def e4m3x4_word_to_f32(words):
    """Four fp32 tensors, bytes 0..3 of each e4m3 x4 word. The conversion unit runs at a
    quarter of the FMA rate: at ~4 TB/s of weights it alone would be the limit, and integer
    ops alone (3 per byte) load that pipe as much, so bytes 0-1 go through the conversion
    unit (e4m3x2 -> f16x2 -> 2 x f32) and bytes 2-3 through integer ops (H200 8B gate_up:
    30.3 us vs 33.9 with all four by integer ops): each byte goes to the top of a register
    (permute); an arithmetic shift by 4 puts the exponent and mantissa bits where fp32 keeps
    its own, the mask keeps the sign and those 7 bits: read as fp32 that is the value times
    2^-120 (the exponent biases differ by 127 - 7; e4m3 subnormals land on fp32 subnormals),
    so one exact multiply by 2^120 finishes. NaN (0x7F) is not mapped: quantized weights
    are finite."""
    return _asm_word_to_4xf32(
        """{
        .reg .b16 lo, hi, h0, h1;
        .reg .b32 f01, t2, t3;
        mov.b32 {lo, hi}, $4;
        cvt.rn.f16x2.e4m3x2 f01, lo;
        mov.b32 {h0, h1}, f01;
        cvt.f32.f16 $0, h0;
        cvt.f32.f16 $1, h1;
        prmt.b32 t2, $4, 0, 0x2444;
        prmt.b32 t3, $4, 0, 0x3444;
        shr.s32 t2, t2, 4;
        shr.s32 t3, t3, 4;
        and.b32 t2, t2, 0x87F00000;
        and.b32 t3, t3, 0x87F00000;
        mul.f32 $2, t2, 0f7B800000;
        mul.f32 $3, t3, 0f7B800000;
        }""",
        words,
    )


@triton.jit
def _asm_word_to_4xf32(asm: tl.constexpr, words):
    return tl.inline_asm_elementwise(
        asm=asm,
        constraints="=r,=r,=r,=r,r",
        args=[words],
        dtype=(tl.float32, tl.float32, tl.float32, tl.float32),
        is_pure=True,
        pack=1,
    )


@triton.jit
def word_byte_f32(words, i: tl.constexpr, FP8: tl.constexpr):
    """Byte ``i`` of each 4-byte word as fp32: int8 by an arithmetic shift, e4m3 by a bitcast."""
    if FP8:
        byte = ((words >> (8 * i)) & 0xFF).to(tl.uint8)
        return byte.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    return ((words << (24 - 8 * i)) >> 24).to(tl.float32)


@triton.jit
def halves_to_f32(words, X16: tl.constexpr):
    """The four X16 (bf16 / fp16) values of each int64 word, low bits first, as fp32."""
    lo, hi = words.to(tl.int32), (words >> 32).to(tl.int32)
    return (
        _half_f32(lo, 0, X16),
        _half_f32(lo, 1, X16),
        _half_f32(hi, 0, X16),
        _half_f32(hi, 1, X16),
    )


@triton.jit
def _half_f32(pair, i: tl.constexpr, X16: tl.constexpr):
    """Half ``i`` (0: low bits) of a 32-bit pair of X16 (bf16 / fp16) values as fp32."""
    if tl.bfloat16 == X16:  # bf16 is the top half of an fp32
        bits = pair << 16 if i == 0 else pair & -65536
        return bits.to(tl.float32, bitcast=True)
    half = pair if i == 0 else pair >> 16
    return half.to(tl.int16).to(X16, bitcast=True).to(tl.float32)


@triton.jit
def i8x4_tile_to_f32(w):
    """int8 tile -> fp32 by the byte permutes of ``I8X4_ASM`` (H200, one row, the 8B
    projections: the GEMV 6-14% faster than with ``.to(tl.float32)``)."""
    return tl.inline_asm_elementwise(
        asm=I8X4_ASM,
        constraints="=r,=r,=r,=r,r",
        args=[w],
        dtype=tl.float32,
        is_pure=True,
        pack=4,
    )
