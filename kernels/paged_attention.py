"""Decode attention over the paged KV cache (Triton): one query token per request.

Each program owns one (request, kv_head) and all ``num_heads // num_kv_heads`` query heads of
that group, so every KV tile is read from memory once per group. Long contexts with few
programs use split-K: the context is cut into ``num_splits`` chunks, each program writes a
partial (max, sum, unnormalized acc) and ``kernels.decode_splits`` combines them.

A lone request that brings its new key (``new_tokens``, the batch-1 decode layer) with
head_dim <= 64 takes one-warp programs of 32 keys, each reading its first tile of cached
keys and values before its PDL wait, while the qkv projection before it still runs; the
new key joins that tile in registers (H200, batch-1 1B in the engine: 1,187 / 1,192 tok/s
vs 1,160 / 1,135 with four-warp programs of 64 keys loading after the wait).

Contexts of different lengths make programs of different lengths: given an ``order`` (the
requests, longest context first) the longest start first and the short ones fill the tail
(H200, W1's 256 contexts of 64-1280 keys on the 8B shapes: 167.7 vs 185.0 us).

An fp8 (e4m3) cache under 16-bit queries is read as int16 words of two features where
head_dim % 32 == 0 (``kernels.fp8_pairs``; the same step: 114 vs 179 us read as bytes).
"""

import torch
import triton
import triton.language as tl

from kernels.attention_tile import (
    attend_loaded,
    attend_tile,
    check_paged_inputs,
    check_score_options,
    dot_dtype_query,
    dot_precision,
    fp16_dots,
    output_buffer,
    score_args,
    tile_rows,
)
from kernels.decode_splits import MAX_SPLITS, choose_num_splits, combine_splits, window_tiles
from kernels.fp8_pairs import attend_tile_pairs
from kernels.kv_cache import new_key_value, store_new_key_value
from kernels.launch import next_power_of_2, num_sms, ptx_widening
from kernels.new_tokens import NewTokens
from kernels.pdl import pdl_launch, wait_for_predecessor
from kernels.rotary import rope_rows

# A batch over an fp8 cache read as word pairs (H200, W1's 256-row step: 102 vs 110 us at
# four warps; W1 8B 10,451 / 10,447 vs 10,337 / 10,360 tok/s). One request keeps four.
PAIRS_WARPS = 2


@triton.jit
def _query(q_rows, cols, mask, cos_sin_row, ROPE: tl.constexpr, HALF: tl.constexpr,
           FP16_DOTS: tl.constexpr):  # fmt: skip
    """Features ``cols`` of the query rows, rotated if ROPE (rounded as the rotary kernel's
    output), in the dots' dtype."""
    if ROPE:
        q = rope_rows(q_rows, cols, mask, cos_sin_row, HALF).to(q_rows.dtype.element_ty)
    else:
        q = tl.load(q_rows + cols, mask=mask, other=0.0)
    return dot_dtype_query(q, FP16_DOTS)


@triton.jit(do_not_specialize=["num_splits"])  # changes with the batch: no recompiles
def _decode_kernel(
    q_ptr,  # [num_reqs, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,
    k_words_ptr,  # PAIRS only: the fp8 caches as int16 (kernels.fp8_pairs)
    v_words_ptr,
    block_tables_ptr,  # [num_reqs, max_blocks]
    seq_lens_ptr,  # [num_reqs]
    out_ptr,  # [num_reqs, num_heads, head_dim]
    part_m_ptr,  # [num_reqs, num_heads, num_splits] fp32 (SPLIT only)
    part_l_ptr,  # [num_reqs, num_heads, num_splits] fp32 (SPLIT only)
    part_acc_ptr,  # [num_reqs, num_heads, num_splits, head_dim] fp32 (SPLIT only)
    positions_ptr,  # [num_reqs] (ROPE only, as the next five)
    k_new_ptr,  # [num_reqs, num_kv_heads, head_dim]: this step's keys, not yet rotated
    v_new_ptr,
    slot_mapping_ptr,  # [num_reqs]
    cos_sin_ptr,  # [max_positions, rotary_dim]: cos half | sin half
    order_ptr,  # [num_reqs] int32: requests, longest context first (ORDERED only)
    qk_scale,
    window,  # SLIDING only: keys before seq_len - window are not seen
    softcap,  # SOFTCAP only (attention_tile.score_args)
    num_splits,
    stride_qt,
    stride_qh,
    stride_kt,  # of k_new / v_new (ROPE only)
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cos,
    stride_ot,
    stride_oh,
    stride_bt,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_wb,  # of the int16 views (PAIRS only)
    stride_ws,
    stride_wh,
    NUM_HEADS: tl.constexpr,
    QUERIES_PER_KV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ROPE: tl.constexpr,  # rotate q / the new key and write the new key / value here
    HALF: tl.constexpr,  # rotary_dim // 2 (ROPE only)
    FP16_DOTS: tl.constexpr,  # fp16_dots()
    ORDERED: tl.constexpr,  # grid (kv_head, rank, split): the longest contexts start first
    PAIRS: tl.constexpr,  # an fp8 cache under fp16 dots, read as int16 words of two features
    PTX: tl.constexpr,  # PAIRS widen by inline PTX (a GPU, not the interpreter)
    PRELOAD: tl.constexpr,  # ROPE, not PAIRS: the first tile's cached keys before the wait
    SLIDING: tl.constexpr,  # a sliding window: only its tiles are read
    SOFTCAP: tl.constexpr,  # soft-capped scores
    PDL: tl.constexpr,
):
    if not PRELOAD:
        wait_for_predecessor(PDL)
    if ORDERED:
        kv_head = tl.program_id(0)
        req = tl.load(order_ptr + tl.program_id(1))
    else:
        req = tl.program_id(0)
        kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + req)
    # Each split covers a whole number of BLOCK_N tiles; trailing splits may be empty.
    first_tile, _, tiles_per_split = window_tiles(seq_len, window, BLOCK_N, num_splits, SLIDING)
    start = (first_tile + split * tiles_per_split) * BLOCK_N
    win_lo = seq_len - window  # SLIDING: the first key the query sees
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)
    if SPLIT and start >= seq_len:  # an empty split: the reduce reads only those with keys
        return

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    block_table_row = block_tables_ptr + req.to(tl.int64) * stride_bt
    if PRELOAD:
        # Before the wait, while the qkv projection still runs: this split's first tile of
        # keys and values that earlier steps wrote (positions < seq_len - 1). seq_lens, the
        # block table and the order come from the step's staged inputs, which no kernel of
        # the step writes; the new key joins the tile in registers below.
        offs_n0, old_mask, kv_off0 = tile_rows(
            block_table_row, start, tl.minimum(end, seq_len - 1), kv_head,
            stride_cb, stride_cs, stride_ch, BLOCK_SIZE, BLOCK_N, True,
        )  # fmt: skip
        d_in = offs_d < HEAD_DIM
        k0 = tl.load(k_cache_ptr + kv_off0[None, :] + offs_d[:, None],
                     mask=old_mask[None, :] & d_in[:, None], other=0.0)  # fmt: skip
        v0 = tl.load(v_cache_ptr + kv_off0[:, None] + offs_d[None, :],
                     mask=old_mask[:, None] & d_in[None, :], other=0.0)  # fmt: skip
        wait_for_predecessor(PDL)
    heads = kv_head * QUERIES_PER_KV + offs_g
    q_rows = q_ptr + req.to(tl.int64) * stride_qt + heads[:, None] * stride_qh
    cos_sin_row = cos_sin_ptr  # ROPE only
    if ROPE:
        cos_sin_row += tl.load(positions_ptr + req).to(tl.int64) * stride_cos
    # PAIRS: q and acc hold the even features (cols), q_odd and acc_odd the odd ones
    COLS: tl.constexpr = BLOCK_D // 2 if PAIRS else BLOCK_D
    cols = tl.arange(0, COLS)[None, :] * (2 if PAIRS else 1)
    q_mask = (offs_g[:, None] < QUERIES_PER_KV) & (cols < HEAD_DIM)
    q = _query(q_rows, cols, q_mask, cos_sin_row, ROPE, HALF, FP16_DOTS)
    acc = tl.zeros([BLOCK_G, COLS], dtype=tl.float32)
    if PAIRS:
        q_odd = _query(q_rows, cols + 1, q_mask, cos_sin_row, ROPE, HALF, FP16_DOTS)
        acc_odd = tl.zeros([BLOCK_G, COLS], dtype=tl.float32)

    # NOTE: finite initial max, so a row whose keys are all masked never computes inf - inf.
    m_i = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    # ROPE: the split holding this step's key (position seq_len - 1) rotates it and writes it
    # and the value to the cache before its tile loop, which then reads them back like any
    # other key (attending to them from registers instead kept ~30 more registers per thread
    # live, and fewer programs fit on an SM). PRELOAD: its first tile, already in registers,
    # takes them there; later tiles read them back.
    if PRELOAD:  # every split takes the new key and value, to join its first tile
        k_new, v_new = new_key_value(
            k_new_ptr, v_new_ptr, k_cache_ptr, v_cache_ptr, req, kv_head, offs_d, cos_sin_row,
            stride_kt, stride_kh, stride_vt, stride_vh, HALF, HEAD_DIM,
        )  # fmt: skip
        if (start < seq_len) & (end == seq_len):  # the split that holds the new position
            store_new_key_value(
                k_cache_ptr, v_cache_ptr, k_new, v_new, slot_mapping_ptr, req, kv_head, offs_d,
                stride_cb, stride_cs, stride_ch, BLOCK_SIZE, HEAD_DIM,
            )  # fmt: skip
        tl.debug_barrier()  # as below: later tiles of this split read the slot back
        new_pos = offs_n0 == seq_len - 1  # [BLOCK_N]: the new key's column, if in this tile
        k0 = tl.where(new_pos[None, :], tl.trans(k_new), k0)
        v0 = tl.where(new_pos[:, None], v_new, v0)
        acc, m_i, l_i = attend_loaded(q, acc, m_i, l_i, k0, v0, offs_n0, offs_n0 < end, qk_scale,
                                      win_lo, softcap, DOT_PRECISION, SLIDING,
                                      SOFTCAP)  # fmt: skip
        first = start + BLOCK_N
    elif ROPE:
        first = start
        if (start < seq_len) & (end == seq_len):
            k_new, v_new = new_key_value(
                k_new_ptr, v_new_ptr, k_cache_ptr, v_cache_ptr, req, kv_head, offs_d,
                cos_sin_row, stride_kt, stride_kh, stride_vt, stride_vh, HALF, HEAD_DIM,
            )  # fmt: skip
            store_new_key_value(
                k_cache_ptr, v_cache_ptr, k_new, v_new, slot_mapping_ptr, req, kv_head, offs_d,
                stride_cb, stride_cs, stride_ch, BLOCK_SIZE, HEAD_DIM,
            )  # fmt: skip
        # NOTE: a CTA barrier makes this CTA's global stores visible to all its threads: the
        # tile loop's loads (cp.async, issued after it: tests/kernels/test_compile_sm90.py
        # checks the order) see the slot just written, found through the block table, so
        # slot_mapping must agree with it (as for the unfused write-then-attend path).
        tl.debug_barrier()
    else:
        first = start

    for n0 in range(first, end, BLOCK_N):
        if PAIRS:
            acc, acc_odd, m_i, l_i = attend_tile_pairs(
                q, q_odd, acc, acc_odd, m_i, l_i, k_words_ptr, v_words_ptr, block_table_row,
                n0, end, kv_head, qk_scale, win_lo, softcap, stride_wb, stride_ws, stride_wh,
                HEAD_DIM, BLOCK_SIZE, BLOCK_N, BLOCK_D, PTX, SLIDING, SOFTCAP,
            )  # fmt: skip
        else:
            acc, m_i, l_i = attend_tile(
                q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, block_table_row, n0, end, m_i,
                kv_head, qk_scale, win_lo, softcap, stride_cb, stride_cs, stride_ch,
                HEAD_DIM, BLOCK_SIZE, BLOCK_N, BLOCK_D, True, False, DOT_PRECISION, SLIDING,
                SOFTCAP,
            )  # fmt: skip

    if SPLIT:
        row = (req * NUM_HEADS + heads) * num_splits + split  # [BLOCK_G]
        g_mask = offs_g < QUERIES_PER_KV
        tl.store(part_m_ptr + row, m_i, mask=g_mask)
        tl.store(part_l_ptr + row, l_i, mask=g_mask)
        acc_rows = part_acc_ptr + row.to(tl.int64)[:, None] * HEAD_DIM
        tl.store(acc_rows + cols, acc, mask=q_mask)
        if PAIRS:
            tl.store(acc_rows + cols + 1, acc_odd, mask=q_mask)
    else:
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        o_rows = out_ptr + req.to(tl.int64) * stride_ot + heads[:, None] * stride_oh
        tl.store(o_rows + cols, (acc / l_safe).to(out_ptr.dtype.element_ty), mask=q_mask)
        if PAIRS:
            tl.store(o_rows + cols + 1, (acc_odd / l_safe).to(out_ptr.dtype.element_ty),
                     mask=q_mask)  # fmt: skip


def paged_attention_decode(
    query: torch.Tensor,  # [num_reqs, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_reqs, max_blocks] int32
    seq_lens: torch.Tensor,  # [num_reqs] int32: context length incl. this token
    scale: float,
    *,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 2,
    out: torch.Tensor | None = None,
    new_tokens: NewTokens | None = None,
    order: torch.Tensor | None = None,
    preload: bool | None = None,
    sliding_window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:  # [num_reqs, num_heads, head_dim]
    """Attention of each request's single new query over its whole cached context.

    With ``new_tokens``, ``query`` is not yet rotated: the kernel applies the rotary
    embedding to it and to the new keys, writes the rotated key and the value at each
    request's slot and attends to them (``kernels.kv_cache.rotary_and_write_kv_cache``
    followed by this, in one kernel). ``seq_lens`` then counts the new token.

    ``order`` (optional, [num_reqs] int32, a permutation of the requests, longest context
    first) is the order programs start in; the result does not depend on it.

    ``max_seq_len`` (a host int; defaults to the block-table capacity, so no device sync)
    and the batch shape pick ``num_splits`` unless it is given. Requests with
    ``seq_len == 0`` (CUDA-graph padding) get zeros. ``out`` (optional, e.g. rows of a
    mixed batch's output) receives the result instead of a new tensor.

    ``block_n`` / ``num_warps`` default to 32 / 1 for a lone request with ``new_tokens`` and
    head_dim <= 64
    (then ``preload`` too: see the module's note; it needs ``new_tokens`` and is off for an
    fp8 cache read as word pairs), to 64 / ``PAIRS_WARPS`` for two or more requests over word
    pairs, else 64 / 4 (``block_n`` 32 past head_dim 128: Gemma's 256).
    The result does not depend on ``preload``.

    ``sliding_window`` (0: full attention): the query at position ``seq_len - 1`` sees only
    the last ``sliding_window`` keys; the tiles before them are skipped (the split-K grid
    shares out the window's tiles alone). ``softcap`` (0: none): scores x become
    ``softcap * tanh(x / softcap)`` (Gemma 2).
    """
    check_paged_inputs(query, k_cache, v_cache, block_tables, seq_lens)
    check_score_options(sliding_window, softcap)
    num_reqs, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert seq_lens.shape == (num_reqs,), f"decode: seq_lens {tuple(seq_lens.shape)} vs query"
    out = output_buffer(query, out)
    if num_reqs == 0:
        return out
    # word pairs need whole 16-byte rows of words (aligned loads) and dots of K >= 16
    pairs = fp16_dots(query, k_cache) and head_dim % 32 == 0
    # (head_dim 128 at one warp spills: 760 bytes a thread, sm_90; kept at four until timed)
    lone = num_reqs == 1 and new_tokens is not None and not pairs and head_dim <= 64
    block_n = block_n or (32 if lone or head_dim > 128 else 64)
    num_warps = num_warps or (1 if lone else PAIRS_WARPS if pairs and num_reqs > 1 else 4)
    preload = (lone if preload is None else preload) and new_tokens is not None and not pairs
    if num_splits is None:
        if max_seq_len is None:
            max_seq_len = block_tables.shape[1] * block_size
        if sliding_window:  # the keys one query reads, at most (its tiles: one more)
            max_seq_len = min(max_seq_len, sliding_window + block_n)
        num_splits = choose_num_splits(
            num_reqs, num_kv_heads, max_seq_len, block_n, num_sms(query.device), num_warps
        )
    assert 1 <= num_splits <= MAX_SPLITS, f"num_splits {num_splits} must be in [1, {MAX_SPLITS}]"

    group = num_heads // num_kv_heads
    block_d = next_power_of_2(head_dim)
    split = num_splits > 1
    part_shape = (num_reqs, num_heads, num_splits) if split else (1,)
    part_m = torch.empty(part_shape, dtype=torch.float32, device=query.device)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty((*part_shape, head_dim) if split else (1,), dtype=torch.float32,
                           device=query.device)  # fmt: skip
    nt = new_tokens
    if nt is not None:
        nt.check(query, k_cache)
    key = nt.key if nt else query  # placeholders when there are no new tokens
    value = nt.value if nt else query
    if order is not None:
        assert order.shape == (num_reqs,) and order.dtype == torch.int32, (
            f"order {tuple(order.shape)} {order.dtype} must be [{num_reqs}] int32"
        )
        assert order.is_contiguous(), f"order {order.stride()} must be contiguous (stride 1)"
        assert order.device == query.device, f"order on {order.device}, query on {query.device}"
        if num_reqs == 1 or num_reqs > 65535:  # nothing to order / past the grid's y limit
            order = None
    grid = (num_kv_heads, num_reqs) if order is not None else (num_reqs, num_kv_heads)
    k_words, v_words = (
        (c.view(torch.int16) for c in (k_cache, v_cache)) if pairs else (k_cache, v_cache)
    )
    qk_scale, softcap_arg = score_args(scale, softcap)
    _decode_kernel[(*grid, num_splits)](
        query, k_cache, v_cache, k_words, v_words, block_tables, seq_lens, out, part_m, part_l,
        part_acc,
        nt.positions if nt else seq_lens, key, value, nt.slot_mapping if nt else seq_lens,
        nt.cos_sin_cache if nt else part_m, order if order is not None else seq_lens,
        qk_scale, sliding_window, softcap_arg, num_splits,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0),
        value.stride(1), nt.cos_sin_cache.stride(0) if nt else 0,
        out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        k_words.stride(0), k_words.stride(1), k_words.stride(2),
        NUM_HEADS=num_heads, QUERIES_PER_KV=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_G=max(16, next_power_of_2(group)), BLOCK_N=block_n, BLOCK_D=block_d,
        SPLIT=split, DOT_PRECISION=dot_precision(query.dtype), ROPE=nt is not None,
        HALF=nt.cos_sin_cache.shape[1] // 2 if nt else 0, FP16_DOTS=fp16_dots(query, k_cache),
        ORDERED=order is not None, PAIRS=pairs, PTX=ptx_widening(query.device),
        PRELOAD=preload, SLIDING=sliding_window > 0, SOFTCAP=softcap > 0, num_warps=num_warps,
        num_stages=num_stages, **pdl_launch(query.device),
    )  # fmt: skip
    if split:
        combine_splits(part_m, part_l, part_acc, out, seq_lens, block_n, sliding_window)
    return out
