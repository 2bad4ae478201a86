"""One row times an int8 / fp8 weight (W8A16 GEMV, Triton): the batch-1 decode projections.

Each program streams ``block_n`` weight rows (gated: and their up rows) along K as 4-byte
words, widens them in registers (inline PTX on a GPU) and reduces once at the end; the
per-channel scale, bias and (gated) SiLU-and-mul run in the epilogue shared with the tiled
kernel in ``kernels.quant_matmul``, whose ``w8a16_matmul`` picks this kernel for one row.
"""

import torch
import triton
import triton.language as tl

from kernels.pdl import pdl_launch, wait_for_predecessor

# 4 int8 (one 32-bit register) -> 4 fp32 without the quarter-rate integer-to-float
# conversion: byte permutes and one subtraction each. A byte b (biased by +128) placed under
# the exponent of 2^23 reads as 2^23 + b; subtracting 2^23 + 128 is exact. Also used by the
# tiled kernel (kernels.quant_matmul._i8x4_to_f32).
_I8X4_ASM: tl.constexpr = tl.constexpr(
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
def _epilogue(acc, acc_up, scale_ptr, bias_ptr, offs_n, n_mask, N, add_bias, HAS_BIAS: tl.constexpr,
              GATED: tl.constexpr, OUT_DTYPE: tl.constexpr):  # fmt: skip
    """Per-channel scale (+ bias, where ``add_bias``) of fp32 accumulators whose last dim is
    ``offs_n``; GATED: ``silu(gate) * up`` with each factor rounded to OUT_DTYPE first, as
    the unfused matmul output followed by ``silu_and_mul`` rounds it."""
    acc = acc * tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32) * add_bias
    if GATED:
        up = acc_up * tl.load(scale_ptr + N + offs_n, mask=n_mask, other=0.0)
        if HAS_BIAS:
            up += tl.load(bias_ptr + N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        gate = acc.to(OUT_DTYPE).to(tl.float32)
        act = (gate * tl.sigmoid(gate)).to(OUT_DTYPE).to(tl.float32)
        acc = act * up.to(OUT_DTYPE).to(tl.float32)
    return acc


@triton.jit
def _i8x4_word_to_f32(words):
    """Four fp32 tensors, bytes 0..3 (k = 4j .. 4j + 3) of each int8x4 word (_I8X4_ASM)."""
    return _asm_word_to_4xf32(_I8X4_ASM, words)


@triton.jit
def _e4m3x4_word_to_f32(words):
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
def _word_byte_f32(words, i: tl.constexpr, FP8: tl.constexpr):
    """Byte ``i`` of each 4-byte word as fp32: int8 by an arithmetic shift, e4m3 by a bitcast."""
    if FP8:
        byte = ((words >> (8 * i)) & 0xFF).to(tl.uint8)
        return byte.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    return ((words << (24 - 8 * i)) >> 24).to(tl.float32)


@triton.jit
def _dot_words(acc, words, x_ptrs, x_mask, EVEN: tl.constexpr, FP8: tl.constexpr,
               PTX_WIDEN: tl.constexpr, X16: tl.constexpr):  # fmt: skip
    """acc += the four bytes of each weight word times x[4j .. 4j + 3]. X16: ``x_ptrs`` are
    int64 pointers to the four 16-bit activations of each word (one load), else pointers to
    x[4j] (four strided loads)."""
    if PTX_WIDEN and FP8:
        w0, w1, w2, w3 = _e4m3x4_word_to_f32(words)
    elif PTX_WIDEN:
        w0, w1, w2, w3 = _i8x4_word_to_f32(words)
    else:
        w0 = _word_byte_f32(words, 0, FP8)
        w1 = _word_byte_f32(words, 1, FP8)
        w2 = _word_byte_f32(words, 2, FP8)
        w3 = _word_byte_f32(words, 3, FP8)
    if X16 is not None:
        xs = tl.load(x_ptrs) if EVEN else tl.load(x_ptrs, mask=x_mask, other=0)
        lo, hi = xs.to(tl.int32), (xs >> 32).to(tl.int32)
        acc += w0 * _half_f32(lo, 0, X16) + w1 * _half_f32(lo, 1, X16)
        acc += w2 * _half_f32(hi, 0, X16) + w3 * _half_f32(hi, 1, X16)
    else:
        acc += w0 * _load_x(x_ptrs, x_mask, EVEN)
        acc += w1 * _load_x(x_ptrs + 1, x_mask, EVEN)
        acc += w2 * _load_x(x_ptrs + 2, x_mask, EVEN)
        acc += w3 * _load_x(x_ptrs + 3, x_mask, EVEN)
    return acc


@triton.jit
def _half_f32(pair, i: tl.constexpr, X16: tl.constexpr):
    """Half ``i`` (0: low bits) of a 32-bit pair of X16 (bf16 / fp16) values as fp32."""
    if tl.bfloat16 == X16:  # bf16 is the top half of an fp32
        bits = pair << 16 if i == 0 else pair & -65536
        return bits.to(tl.float32, bitcast=True)
    half = pair if i == 0 else pair >> 16
    return half.to(tl.int16).to(X16, bitcast=True).to(tl.float32)


@triton.jit
def _load_x(ptrs, mask, EVEN: tl.constexpr):
    x = tl.load(ptrs) if EVEN else tl.load(ptrs, mask=mask, other=0.0)
    return x.to(tl.float32)


@triton.jit
def _load_words(ptrs, mask, EVEN: tl.constexpr):
    return tl.load(ptrs) if EVEN else tl.load(ptrs, mask=mask, other=0)


@triton.jit
def _w8_gemv_kernel(
    x_ptr,  # [K] one dense row, fp32 / fp16 / bf16
    w_ptr,  # [N, K] int8 (or fp8 e4m3), K % 4 == 0; GATED: [2N, K], gate rows then up rows
    scale_ptr,  # [N] fp32 (GATED: [2N])
    bias_ptr,  # [N] (HAS_BIAS only; GATED: [2N])
    out_ptr,  # [N]
    N,
    K,
    stride_wn,  # in bytes, a multiple of 4
    up_offset,  # GATED: N * stride_wn, where the up rows start
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN: tl.constexpr,  # N % BLOCK_N == 0 and K % BLOCK_K == 0: no masks
    GATED: tl.constexpr,
    FP8: tl.constexpr,
    PTX_WIDEN: tl.constexpr,  # widen by byte permutes (GPU): int8 or e4m3
    PREFETCH: tl.constexpr,  # K tiles requested ahead of the one being multiplied (0-2)
    X16: tl.constexpr,  # x's dtype if bf16 / fp16 and 8-byte aligned (packed loads), else None
    PDL: tl.constexpr,
):
    """One row times the weight: each program streams BLOCK_N weight rows (GATED: and the
    matching up rows) along K and reduces once at the end; no tensor-core tile is padded out
    from a single row.

    The weight is read as 4-byte words, [BLOCK_N, BLOCK_K / 4]: word j of a row holds
    k = 4j .. 4j + 3, widened to four fp32 tensors that multiply four interleaved slices of
    x (L1 hits) into one accumulator a quarter of the tile's size, so registers go to bytes
    in flight. Plain loads are not software-pipelined by Triton, so the loop does it in
    registers: tile ``k + PREFETCH`` is requested before tile ``k`` is multiplied; near the
    end the requests repeat the last tile (cache hits) instead of masking. The first tiles
    are requested before waiting on the previous kernel (weights never depend on it): with
    PDL the weight stream starts while that kernel still runs."""
    BLOCK_W: tl.constexpr = BLOCK_K // 4
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, BLOCK_W)
    n_mask = offs_n < N
    words = w_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    rows = words + offs_n[:, None].to(tl.int64) * (stride_wn // 4) + offs_w[None, :]
    up = up_offset // 4
    # The activations of every weight word, broadcast over the rows: each thread loads
    # exactly those its words multiply, in their layout (no shuffle through shared memory).
    if X16 is not None:
        x_cols = x_ptr.to(tl.pointer_type(tl.int64), bitcast=True) + offs_w[None, :]
    else:
        x_cols = x_ptr + 4 * offs_w[None, :]
    x_cols += 0 * offs_n[:, None]
    x_step: tl.constexpr = 4 if X16 is None else 1  # x_cols advance per word
    last = (K - 1) // BLOCK_K * BLOCK_W  # first word of the last K tile
    w0, u0 = _load_tile(rows, up, 0, n_mask, offs_w, K, EVEN, GATED)
    if PREFETCH >= 2:
        w1, u1 = _load_tile(rows, up, tl.minimum(BLOCK_W, last), n_mask, offs_w, K, EVEN, GATED)
    wait_for_predecessor(PDL)
    acc = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
    for j0 in range(0, K // 4, BLOCK_W):
        if PREFETCH >= 1:  # request tile j0 + PREFETCH now, multiply it later
            jn = tl.minimum(j0 + PREFETCH * BLOCK_W, last)
            wn, un = _load_tile(rows, up, jn, n_mask, offs_w, K, EVEN, GATED)
        x_mask = (4 * (j0 + offs_w) < K)[None, :]
        x_j = x_cols + x_step * j0
        acc = _dot_words(acc, w0, x_j, x_mask, EVEN, FP8, PTX_WIDEN, X16)
        if GATED:
            acc_up = _dot_words(acc_up, u0, x_j, x_mask, EVEN, FP8, PTX_WIDEN, X16)
        if PREFETCH == 0:  # the next tile requested only after this one is multiplied
            w0, u0 = _load_tile(rows, up, tl.minimum(j0 + BLOCK_W, last), n_mask, offs_w, K,
                                EVEN, GATED)  # fmt: skip
        elif PREFETCH == 1:
            w0, u0 = wn, un
        else:
            w0, u0, w1, u1 = w1, u1, wn, un
    out = _epilogue(tl.sum(acc, axis=1), tl.sum(acc_up, axis=1), scale_ptr, bias_ptr, offs_n,
                    n_mask, N, 1.0, HAS_BIAS, GATED, out_ptr.dtype.element_ty)  # fmt: skip
    tl.store(out_ptr + offs_n, out.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _load_tile(rows, up, j, n_mask, offs_w, K, EVEN: tl.constexpr, GATED: tl.constexpr):
    """Words ``j + offs_w`` of the gate rows and (GATED) of the up rows ``up`` words on."""
    mask = n_mask[:, None] & (4 * (j + offs_w) < K)[None, :]
    w = _load_words(rows + j, mask, EVEN)
    return w, _load_words(rows + up + j, mask, EVEN) if GATED else w


def gemv_layout(qweight: torch.Tensor) -> bool:
    """Whether the GEMV can read ``qweight`` [N, K] as 4-byte words along K."""
    return (
        qweight.stride(1) == 1
        and qweight.shape[1] % 4 == 0
        and qweight.stride(0) % 4 == 0
        and qweight.data_ptr() % 4 == 0
    )


def _x16(x: torch.Tensor) -> tl.dtype | None:
    """The GEMV's X16: a dense bf16 / fp16 row at an 8-byte aligned address, else None."""
    if not x.is_contiguous() or x.data_ptr() % 8:
        return None
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}.get(x.dtype)


def w8_gemv(
    x: torch.Tensor,  # [1, K] fp32 / fp16 / bf16
    qweight: torch.Tensor,  # [N, K] int8 / float8_e4m3fn (gated: [2N, K]), gemv_layout
    scale: torch.Tensor,  # [N] fp32 (gated: [2N])
    bias: torch.Tensor | None,
    out: torch.Tensor,  # [1, N] (gated: N of the 2N rows)
    block_n: int,
    block_k: int,
    num_warps: int,
    *,
    prefetch: int,
    gated: bool,
    ptx: bool,  # widen by inline PTX (a GPU, never the interpreter)
) -> None:
    """Launches the GEMV into ``out``; ``w8a16_matmul`` checks the inputs."""
    n, k = out.shape[1], qweight.shape[1]
    xc = x.contiguous()
    _w8_gemv_kernel[(triton.cdiv(n, block_n),)](
        xc, qweight, scale, bias if bias is not None else scale, out, n, k,
        qweight.stride(0), n * qweight.stride(0) if gated else 0,
        BLOCK_N=block_n, BLOCK_K=block_k, HAS_BIAS=bias is not None,
        EVEN=n % block_n == 0 and k % block_k == 0, GATED=gated,
        FP8=qweight.dtype == torch.float8_e4m3fn, PTX_WIDEN=ptx,
        PREFETCH=prefetch, X16=_x16(xc), num_warps=num_warps, num_stages=1,
        **pdl_launch(x.device),
    )  # fmt: skip
