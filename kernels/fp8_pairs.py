"""Decode attention's tile step over an fp8 (e4m3) cache read as int16 words, two features
each: one ``cvt`` widens a word into its even and its odd feature (fp16, exact), and the
query, the accumulator and both dots split the same way (even features, odd features).

Why: loaded as bytes, e4m3 tiles reach the dots through byte-wide shared-memory reads and
conversions in the dot-operand layout (Triton 3.6, sm_90: 148 registers, 562 instructions a
64-key tile per warp); as 16-bit words they take the ldmatrix path that bf16 takes (84
registers, 427). H200, W1's 256-row decode step on the 8B shapes, the rotary and KV write
fused: 114 us against 179 us reading bytes and 169 us for a bf16 cache
(``benchmarks/fp8_decode_probe.py``; benchmarks/RESULTS.md, twenty-second session).
"""

import triton
import triton.language as tl

from kernels.attention_tile import modify_scores, online_softmax, tile_rows

_WIDEN_ASM = tl.constexpr("""{ .reg .b16 x0, x1; .reg .b32 a, b;
    mov.b32 {x0, x1}, $2;
    cvt.rn.f16x2.e4m3x2 a, x0;
    cvt.rn.f16x2.e4m3x2 b, x1;
    prmt.b32 $0, a, b, 0x5410;
    prmt.b32 $1, a, b, 0x7632; }""")


@triton.jit
def widen_pairs(words, PTX: tl.constexpr):
    """int16 words of two e4m3 (low byte: the even feature) -> (even, odd) fp16, exactly.
    PTX: one ``cvt`` a word (a GPU); otherwise by bytes (the interpreter)."""
    if PTX:
        return tl.inline_asm_elementwise(
            asm=_WIDEN_ASM,
            constraints="=r,=r,r",
            args=[words],
            dtype=(tl.float16, tl.float16),
            is_pure=True,
            pack=2,
        )
    even = (words & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
    odd = ((words >> 8) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
    return even, odd


@triton.jit
def attend_tile_pairs(
    q_even,  # [ROWS, BLOCK_D // 2] fp16: the query's even features
    q_odd,
    acc_even,  # [ROWS, BLOCK_D // 2] fp32, unnormalized
    acc_odd,
    m_i,
    l_i,
    k_words_ptr,  # the fp8 caches as int16
    v_words_ptr,
    block_table_row,
    n0,
    kv_end,
    kv_head,
    qk_scale,
    win_lo,
    softcap,
    stride_wb,  # the int16 views' strides
    stride_ws,
    stride_wh,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PTX: tl.constexpr,
    SLIDING: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """``attention_tile.attend_tile`` (masked keys, no causal mask) over word pairs."""
    offs_n, n_mask, kv_off = tile_rows(block_table_row, n0, kv_end, kv_head, stride_wb, stride_ws,
                                  stride_wh, BLOCK_SIZE, BLOCK_N, True)  # fmt: skip
    offs_w = tl.arange(0, BLOCK_D // 2)
    w_mask = offs_w < HEAD_DIM // 2
    k_mask = n_mask[None, :] & w_mask[:, None]
    k_even, k_odd = widen_pairs(
        tl.load(k_words_ptr + kv_off[None, :] + offs_w[:, None], mask=k_mask, other=0), PTX
    )
    s = (tl.dot(q_even, k_even) + tl.dot(q_odd, k_odd)) * qk_scale  # [ROWS, BLOCK_N]
    s = modify_scores(s, offs_n, win_lo, softcap, SLIDING, SOFTCAP)
    s = tl.where(n_mask[None, :], s, float("-inf"))
    p, alpha, m_new, l_i = online_softmax(s, m_i, l_i)

    v_mask = n_mask[:, None] & w_mask[None, :]
    v_even, v_odd = widen_pairs(
        tl.load(v_words_ptr + kv_off[:, None] + offs_w[None, :], mask=v_mask, other=0), PTX
    )
    p = p.to(tl.float16)
    acc_even = acc_even * alpha[:, None] + tl.dot(p, v_even)
    acc_odd = acc_odd * alpha[:, None] + tl.dot(p, v_odd)
    return acc_even, acc_odd, m_new, l_i
