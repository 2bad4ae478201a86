"""Weight-only int8 matmul (W8A16, Triton): ``out = (x @ q.T) * scale + bias``.

The weight stays int8 in memory and is widened tile by tile in registers (via fp32; exact:
|q| <= 127 fits the 8-bit mantissa of bf16, as every e4m3 value does); the per-output-channel scale
multiplies the fp32 accumulator once, after the K loop. Decode is weight-bandwidth bound, so
reading 1 byte per weight instead of 2 is the whole point; small-M launches split K across
programs (partials in fp32, summed in a fixed order: deterministic) to fill the GPU.

``gated=True`` takes a merged [gate; up] weight (SwiGLU) and returns ``silu(gate) * up``:
in the one-row GEMV each program accumulates gate rows and the matching up rows, so the
activation runs in the epilogue instead of a separate kernel over a [1, 2N] intermediate.
"""

import dataclasses
import math

import torch
import triton
import triton.language as tl

from kernels.paged_attention import dot_precision, num_sms
from kernels.pdl import pdl_launch, wait_for_predecessor

# 4 int8 (one 32-bit register) -> 4 fp32, see _i8x4_to_f32
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
def _i8x4_to_f32(w):
    """int8 -> fp32 without the quarter-rate integer-to-float conversion: each register of 4
    bytes becomes 4 floats by byte permutes and one subtraction each. A byte b (biased by
    +128) placed under the exponent of 2^23 reads as 2^23 + b; subtracting 2^23 + 128 is exact.
    (H200, one row, the 8B projections: the GEMV 6-14% faster than with ``.to(tl.float32)``.)"""
    return tl.inline_asm_elementwise(
        asm=_I8X4_ASM,
        constraints="=r,=r,=r,=r,r",
        args=[w],
        dtype=tl.float32,
        is_pure=True,
        pack=4,
    )


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
    interpreter) widens with ``_i8x4_to_f32``.
    """
    w = _i8x4_to_f32(w) if FAST_I8 else w.to(tl.float32)
    return w if EVEN else tl.where(mask, w, 0.0)


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
    FAST_I8: tl.constexpr,  # int8 weights widened by _i8x4_to_f32
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
    acc = _epilogue(acc, acc, scale_ptr, bias_ptr, offs_n, n_mask, N,
                    (pid_k == 0).to(tl.float32),  # the bias is added by one split only
                    HAS_BIAS, False, out_ptr.dtype.element_ty)  # fmt: skip
    out = out_ptr + pid_k * stride_os + offs_m[:, None].to(tl.int64) * stride_om
    tl.store(out + offs_n[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])  # fmt: skip


@triton.jit
def _i8x4_word_to_f32(words):
    """Four fp32 tensors, bytes 0..3 (k = 4j .. 4j + 3) of each int8x4 word, by the byte
    permutes of ``_i8x4_to_f32``."""
    return _asm_word_to_4xf32(_I8X4_ASM, words)


@triton.jit
def _e4m3x4_word_to_f32(words, MIXED: tl.constexpr):
    """Four fp32 tensors, bytes 0..3 of each e4m3 x4 word. The conversion unit runs at a
    quarter of the FMA rate: at ~4 TB/s of weights it alone would be the limit, so (MIXED)
    bytes 0-1 go through it (e4m3x2 -> f16x2 -> 2 x f32) and bytes 2-3 through integer ops,
    or (not MIXED) all four through integer ops: each byte goes to the top of a register
    (permute); an arithmetic shift by 4 puts the exponent and mantissa bits where fp32 keeps
    its own, the mask keeps the sign and those 7 bits: read as fp32 that is the value times
    2^-120 (the exponent biases differ by 127 - 7; e4m3 subnormals land on fp32 subnormals),
    so one exact multiply by 2^120 finishes. NaN (0x7F) is not mapped: quantized weights
    are finite."""
    if MIXED:
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
    return _asm_word_to_4xf32(
        """{
        .reg .b32 t0, t1, t2, t3;
        prmt.b32 t0, $4, 0, 0x0444;
        prmt.b32 t1, $4, 0, 0x1444;
        prmt.b32 t2, $4, 0, 0x2444;
        prmt.b32 t3, $4, 0, 0x3444;
        shr.s32 t0, t0, 4;
        shr.s32 t1, t1, 4;
        shr.s32 t2, t2, 4;
        shr.s32 t3, t3, 4;
        and.b32 t0, t0, 0x87F00000;
        and.b32 t1, t1, 0x87F00000;
        and.b32 t2, t2, 0x87F00000;
        and.b32 t3, t3, 0x87F00000;
        mul.f32 $0, t0, 0f7B800000;
        mul.f32 $1, t1, 0f7B800000;
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
               PTX_WIDEN: tl.constexpr, FP8_MIXED: tl.constexpr, X16: tl.constexpr):  # fmt: skip
    """acc += the four bytes of each weight word times x[4j .. 4j + 3]. X16: ``x_ptrs`` are
    int64 pointers to the four 16-bit activations of each word (one load), else pointers to
    x[4j] (four strided loads)."""
    if PTX_WIDEN and FP8:
        w0, w1, w2, w3 = _e4m3x4_word_to_f32(words, FP8_MIXED)
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
    FP8_MIXED: tl.constexpr,  # e4m3 bytes 0-1 widened by the conversion unit
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
        acc = _dot_words(acc, w0, x_j, x_mask, EVEN, FP8, PTX_WIDEN, FP8_MIXED, X16)
        if GATED:
            acc_up = _dot_words(acc_up, u0, x_j, x_mask, EVEN, FP8, PTX_WIDEN, FP8_MIXED,
                                X16)  # fmt: skip
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
    prefetch: int = 1  # GEMV: K tiles requested ahead of the one being multiplied (0-2)
    fp8_mixed: bool = True  # GEMV, e4m3 on a GPU: half the bytes through the conversion unit

    def __post_init__(self) -> None:
        assert 0 <= self.prefetch <= 2, f"prefetch {self.prefetch} must be 0, 1 or 2"


def ptx_widening(device: torch.device) -> bool:
    """Whether weights widen by inline PTX byte permutes (int8 tiles and int8 / e4m3 GEMV
    words; CUDA only, never the interpreter, whose tensors live on the CPU)."""
    return device.type == "cuda"


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
) -> torch.Tensor:  # [..., N] in x.dtype (gated: [..., N / 2])
    """Same semantics as ``kernels.reference.w8a16_linear``; with ``gated`` (a merged
    [gate; up] weight), as ``kernels.reference.silu_and_mul`` of that: fused into the GEMV's
    epilogue (one row; ``config`` tiles the output columns, each paired with its up row),
    else the matmul then the activation kernel."""
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
    ptx = ptx_widening(x.device)
    cfg = config or default_config(m, rows, k, num_sms(x.device))
    if config is None and cfg.block_m == 1 and not gemv_layout(qweight):
        cfg = default_config(2, rows, k, num_sms(x.device))  # the tiled kernel's tiles
    if gated and cfg.block_m != 1:  # the tiled kernel has no gated epilogue
        from kernels.activation import silu_and_mul

        return silu_and_mul(w8a16_matmul(x2, qweight, scale, bias, cfg)).view(*x.shape[:-1], n)
    if cfg.block_m == 1:
        assert m == 1, f"the GEMV config takes one row, got {m}"
        assert gemv_layout(qweight), (
            f"the GEMV reads 4-byte words: it needs a K-contiguous weight, K % 4 == 0 and rows "
            f"4-byte aligned; got shape {tuple(qweight.shape)}, stride {qweight.stride()}"
        )
        xc = x2.contiguous()
        _w8_gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
            xc, qweight, scale, bias if bias is not None else scale, out, n, k,
            qweight.stride(0), n * qweight.stride(0) if gated else 0,
            BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, HAS_BIAS=bias is not None,
            EVEN=n % cfg.block_n == 0 and k % cfg.block_k == 0, GATED=gated, FP8=not int8,
            PTX_WIDEN=ptx, FP8_MIXED=cfg.fp8_mixed, PREFETCH=cfg.prefetch, X16=_x16(xc),
            **pdl_launch(x.device),
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
        DOT_PRECISION=dot_precision(x.dtype), FAST_I8=int8 and ptx,
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
    block = triton.next_power_of_2(k)
    _fp8_quantize_rows_kernel[(m,)](
        x, q, scale, k, x.stride(0), q.stride(0),
        FP8_MAX=torch.finfo(torch.float8_e4m3fn).max, MIN_SCALE=1e-12, BLOCK_K=block,
        num_warps=min(max(block // 512, 1), 16),
    )  # fmt: skip
    return q, scale
