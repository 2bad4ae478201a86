"""Split-K decode attention: how many chunks a request's context is cut into, and the kernel
that combines the chunks' partials (``kernels.paged_attention`` writes them).

Each split that holds keys writes its running max (log2 domain), sum and unnormalized output
for every query head; the reduce rescales them to the largest max and divides by the total
sum. A context shorter than the grid leaves trailing splits empty: they exit at once, write
nothing, and the reduce reads only the splits that hold keys. Under a sliding window (SLIDING)
the splits share out only the tiles from the one holding the window's first key.
"""

import math

import torch
import triton
import triton.language as tl

from kernels.launch import next_power_of_2
from kernels.pdl import pdl_launch, wait_for_predecessor


@triton.jit
def split_tiles(seq_len, block_n, num_splits):
    """Key tiles of ``block_n`` in a context of ``seq_len`` keys, and in each of its
    ``num_splits`` splits (whole tiles, at least one): the decode kernel's split ``s`` covers
    tiles [s * per_split, (s + 1) * per_split) and holds keys iff s * per_split < tiles."""
    tiles = tl.cdiv(seq_len, block_n)
    return tiles, tl.maximum(tl.cdiv(tiles, num_splits), 1)


@triton.jit
def window_tiles(seq_len, window, block_n, num_splits, SLIDING: tl.constexpr):
    """``split_tiles`` over the tiles a query at position ``seq_len - 1`` sees: (its first
    tile, tiles, tiles per split); SLIDING: those holding keys in its ``window``, else all
    (first tile 0)."""
    if SLIDING:
        first = tl.maximum(seq_len - window, 0) // block_n
        tiles = tl.cdiv(seq_len, block_n) - first
        per_split = tl.maximum(tl.cdiv(tiles, num_splits), 1)
    else:
        first = 0
        tiles, per_split = split_tiles(seq_len, block_n, num_splits)
    return first, tiles, per_split


@triton.jit(do_not_specialize=["num_splits"])
def _decode_reduce_kernel(
    part_m_ptr,  # [num_reqs, num_heads, num_splits] fp32
    part_l_ptr,
    part_acc_ptr,  # [num_reqs, num_heads, num_splits, head_dim] fp32
    out_ptr,  # [num_reqs, num_heads, head_dim]
    seq_lens_ptr,  # [num_reqs] int32
    num_splits,
    block_n,  # the decode kernel's key tile: splits cover whole tiles
    window,  # SLIDING only: the decode kernel's window
    stride_ot,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SLIDING: tl.constexpr,
    PDL: tl.constexpr,
):
    req = tl.program_id(0)
    head = tl.program_id(1)
    # Before the wait: seq_lens are the step's staged inputs, which no kernel of ours writes
    # (the decode kernel's preload reads them early too).
    seq_len = tl.load(seq_lens_ptr + req)
    _, tiles, tiles_per_split = window_tiles(seq_len, window, block_n, num_splits, SLIDING)
    wait_for_predecessor(PDL)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < tl.cdiv(tiles, tiles_per_split)  # splits past the context are empty
    row = (req * NUM_HEADS + head).to(tl.int64) * num_splits + offs_s  # [BLOCK_S]
    m = tl.load(part_m_ptr + row, mask=s_mask, other=-1.0e30)
    l = tl.load(part_l_ptr + row, mask=s_mask, other=0.0)  # noqa: E741
    w = tl.exp2(m - tl.max(m, 0))  # masked splits: l == 0, acc == 0
    l_total = tl.sum(l * w, 0)
    mask = s_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    acc = tl.load(part_acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(l_total > 0.0, l_total, 1.0)
    o_off = req.to(tl.int64) * stride_ot + head * stride_oh + offs_d
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


MAX_SPLITS = 128


def choose_num_splits(
    num_reqs: int,
    num_kv_heads: int,
    max_seq_len: int,
    block_n: int,
    sm_count: int,
    num_warps: int = 4,
) -> int:
    """Split the context only when (request, kv_head) programs alone cannot fill the GPU.

    Aims at ~16 warps per SM (4 programs of four warps, 16 of one), down to one key tile per
    split: a few requests are latency bound, not bandwidth bound (H200, 8 kv heads, one
    request, graph replays: 1,024 keys take 10.1 us in 4 splits, 6.1 us in 16; 512 keys
    10.0 us in 2, 5.5 us in 8). Under CUDA graphs ``max_seq_len`` is the table's capacity;
    the kernel spreads the actual context over the splits, so short ones leave trailing
    splits empty.
    """
    programs = num_reqs * num_kv_heads
    tiles = math.ceil(max_seq_len / block_n)
    if programs >= 2 * sm_count or tiles < 2:
        return 1
    per_sm = max(1, 16 // num_warps)
    return max(1, min(math.ceil(per_sm * sm_count / programs), tiles, MAX_SPLITS))


def reduce_block(num_splits: int) -> int:
    """The reduce's splits in one tile: 64, or all 128 for a larger grid (two compiles in
    all). H200, graph replays (``kernels.paged_attention``'s grids): 128 for every grid
    costs 4 Llama-3-8B-head requests nothing but 16 of them 1.3 us (29.2 vs 27.9) and 32
    of them 4.4 us (35.3 vs 30.9), its larger register tile holding fewer programs an SM;
    a loop over 64-split chunks costs the larger grids ~1 us (one request at 4,096 keys,
    1B heads: 9.7-10.0 vs 8.3-8.5 us; at 32,768: 26.6 vs 25.5)."""
    return 64 if num_splits <= 64 else MAX_SPLITS


def combine_splits(
    part_m: torch.Tensor,  # [num_reqs, num_heads, num_splits] fp32
    part_l: torch.Tensor,
    part_acc: torch.Tensor,  # [num_reqs, num_heads, num_splits, head_dim] fp32
    out: torch.Tensor,  # [num_reqs, num_heads, head_dim], rows of a dense head_dim
    seq_lens: torch.Tensor,  # [num_reqs] int32, as the decode kernel read them
    block_n: int,  # the decode kernel's key tile
    sliding_window: int = 0,  # the decode kernel's (0: full attention)
) -> None:
    """Write each (request, head)'s attention output from its splits' partials into ``out``."""
    num_reqs, num_heads, num_splits, head_dim = part_acc.shape
    _decode_reduce_kernel[(num_reqs, num_heads)](
        part_m, part_l, part_acc, out, seq_lens, num_splits, block_n, sliding_window,
        out.stride(0), out.stride(1),
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_S=reduce_block(num_splits),
        BLOCK_D=next_power_of_2(head_dim), SLIDING=sliding_window > 0, num_warps=4,
        **pdl_launch(out.device),
    )  # fmt: skip
