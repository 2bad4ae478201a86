"""The fused MoE's routing step (Triton): token-expert pairs grouped by expert, each expert's
run padded to a multiple of BLOCK_M, in one launch for up to ``CHUNK`` pairs (decode), two
beyond (``kernels.reference.align_pairs`` took about a dozen torch launches a layer).

A program places the pairs of one chunk. It needs every expert's total (where each expert's
run starts) and the counts of the chunks before its own (where its pairs go in the run): with
one chunk it counts them itself; with more, a first launch writes each chunk's counts and
every program of the second sums that [chunks, experts] table. Within a chunk a pair's rank
among the same expert's pairs is the number of them before it, so the order is the
reference's stable one (pair order within each expert), deterministic at no extra cost:
compares of a sub-block of pairs with itself and with the expert ids, no atomics. The same
programs write each M tile's expert and the padding of its rows (disjoint from the pairs'
slots: nothing is written twice, so no launch order within the grid matters).

NOTE: CUDA-graph safe: every shape (grid, outputs, the count table) is a function of
num_pairs, num_experts and BLOCK_M alone, and nothing is read back on the host.
"""

import torch
import triton
import triton.language as tl

from kernels.launch import cdiv, next_power_of_2

# pairs a program places: more programs beat one launch fewer from 256 pairs on (H200, CUDA
# graph, us, `moe_probe.py --align`; chunks of 256 / 1024: Mixtral 256 tokens 10.8 / 15.6,
# 4096 tokens 12.4 / 16.2; Qwen3-30B-A3B 256 tokens 18.8 / 36.1, 4096 tokens 18.3 / 36.9;
# torch's dozen launches 52-132)
CHUNK = 256
MAX_EXPERTS = 1024  # [pairs or tiles per step, experts] compares stay in registers


@triton.jit
def _chunk_counts(ids_ptr, lo, num_pairs, CHUNK: tl.constexpr, E_POW2: tl.constexpr):
    """[E_POW2] int32: how many of pairs lo .. lo + CHUNK - 1 (below num_pairs) each expert has."""
    offs = lo + tl.arange(0, CHUNK)
    ok = offs < num_pairs
    ids = tl.load(ids_ptr + offs, mask=ok, other=0).to(tl.int32)
    return tl.histogram(ids, E_POW2, mask=ok)


@triton.jit(do_not_specialize=["num_pairs"])  # the token count changes every step
def _expert_count_kernel(
    ids_ptr,  # [num_pairs] int32 / int64: each pair's expert
    counts_ptr,  # [chunks, E_POW2] int32
    num_pairs,
    CHUNK: tl.constexpr,
    E_POW2: tl.constexpr,
):
    pid = tl.program_id(0)
    counts = _chunk_counts(ids_ptr, pid * CHUNK, num_pairs, CHUNK, E_POW2)
    tl.store(counts_ptr + pid * E_POW2 + tl.arange(0, E_POW2), counts)


@triton.jit(do_not_specialize=["num_pairs", "num_tiles"])
def _align_pairs_kernel(
    ids_ptr,  # [num_pairs] int32 / int64: each pair's expert
    counts_ptr,  # [chunks, E_POW2] int32 per-chunk counts (COUNTED only)
    sorted_pairs_ptr,  # [num_tiles * BLOCK_M] int32: pairs by expert, padding = num_pairs
    tile_expert_ptr,  # [num_tiles] int32
    num_padded_ptr,  # [1] int32
    num_pairs,
    num_experts,
    num_tiles,
    COUNTED: tl.constexpr,  # more than one chunk: counts_ptr holds every chunk's counts
    BLOCK_M: tl.constexpr,
    CHUNK: tl.constexpr,
    SUB: tl.constexpr,  # pairs placed per step (a power of two dividing CHUNK)
    ROWS: tl.constexpr,  # count-table rows summed per step
    TILES: tl.constexpr,  # M tiles written per step
    E_POW2: tl.constexpr,
):
    pid = tl.program_id(0)
    chunks = tl.num_programs(0)
    experts = tl.arange(0, E_POW2)
    if COUNTED:
        total = tl.zeros([E_POW2], dtype=tl.int32)
        before = tl.zeros([E_POW2], dtype=tl.int32)  # this expert's pairs in earlier chunks
        for r0 in range(0, chunks, ROWS):
            rows = (r0 + tl.arange(0, ROWS))[:, None]
            table = tl.load(counts_ptr + rows * E_POW2 + experts[None, :], rows < chunks, 0)
            total += tl.sum(table, 0)
            before += tl.sum(tl.where(rows < pid, table, 0), 0)
    else:
        total = _chunk_counts(ids_ptr, 0, num_pairs, CHUNK, E_POW2)
        before = tl.zeros([E_POW2], dtype=tl.int32)
    padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, 0)  # where each expert's padded run ends
    start = end - padded
    if pid == 0:
        tl.store(num_padded_ptr, tl.sum(padded, 0))
    # M tiles, strided over the programs: a tile's expert is the first whose run ends past
    # the tile's start (tiles past the padded count: the last expert, as the reference's
    # clamp); its rows from that expert's last pair on are padding.
    pairs_end = start + total
    for t0 in range(pid * TILES, num_tiles, chunks * TILES):
        tiles = t0 + tl.arange(0, TILES)
        ended = (end[None, :] <= tiles[:, None] * BLOCK_M) & (experts[None, :] < num_experts)
        tile_expert = tl.minimum(tl.sum(ended.to(tl.int32), 1), num_experts - 1)
        tile_ok = tiles < num_tiles
        tl.store(tile_expert_ptr + tiles, tile_expert, mask=tile_ok)
        mine = experts[None, :] == tile_expert[:, None]
        real_end = tl.sum(tl.where(mine, pairs_end[None, :], 0), 1)  # [TILES]
        slots = tiles[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
        padding = (slots >= real_end[:, None]) & tile_ok[:, None]
        tl.store(sorted_pairs_ptr + slots, tl.zeros([TILES, BLOCK_M], tl.int32) + num_pairs,
                 mask=padding)  # fmt: skip
    # This chunk's pairs, SUB at a time, in pair order: a pair's slot is its expert's next
    # free one plus the number of the same expert's pairs before it in the step.
    next_slot = start + before  # [E_POW2]
    lo = pid * CHUNK
    for s0 in range(lo, tl.minimum(lo + CHUNK, num_pairs), SUB):
        pairs = s0 + tl.arange(0, SUB)
        ok = pairs < num_pairs
        ids = tl.load(ids_ptr + pairs, mask=ok, other=-1).to(tl.int32)
        earlier = tl.arange(0, SUB)[None, :] < tl.arange(0, SUB)[:, None]
        same = (ids[None, :] == ids[:, None]) & earlier
        rank = tl.sum(same.to(tl.int32), 1)
        onehot = ids[:, None] == experts[None, :]  # [SUB, E_POW2]
        slot = tl.sum(tl.where(onehot, next_slot[None, :], 0), 1) + rank
        tl.store(sorted_pairs_ptr + slot, pairs, mask=ok)
        next_slot += tl.sum(onehot.to(tl.int32), 0)


def max_tiles(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Upper bound of the padded M tiles: every expert with pairs adds at most one partial."""
    return cdiv(num_pairs, block_m) + min(num_experts, num_pairs)


def align_pairs(
    topk_ids: torch.Tensor,  # [num_tokens, top_k] int32 / int64, each < num_experts
    num_experts: int,
    block_m: int,
    chunk: int = CHUNK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted pairs [max_tiles * block_m] int32, padding = num_pairs; the expert of each M
    tile [max_tiles] int32; the padded pair count [1] int32), all on the device, no sync:
    ``kernels.reference.align_pairs``'s outputs exactly. ``chunk`` (pairs a program
    places, a power of two) is for tests and ``benchmarks/moe_probe.py --align``."""
    assert topk_ids.dim() == 2 and topk_ids.dtype in (torch.int32, torch.int64), (
        f"topk_ids {topk_ids.dtype} {tuple(topk_ids.shape)}: int32 / int64 [tokens, top_k]"
    )
    assert 0 < num_experts <= MAX_EXPERTS, f"{num_experts} experts: 1 to {MAX_EXPERTS}"
    assert block_m > 0 and block_m & (block_m - 1) == 0, f"block_m {block_m}: a power of 2"
    assert chunk >= 16 and chunk & (chunk - 1) == 0, f"chunk {chunk}: a power of 2 >= 16"
    flat = topk_ids.reshape(-1)  # [num_pairs] (a view of the router's dense ids)
    num_pairs, device = flat.numel(), flat.device
    num_tiles = max_tiles(num_pairs, num_experts, block_m)
    assert num_tiles * block_m < 2**31, f"{num_pairs} pairs: slots past int32"
    e_pow2 = max(16, next_power_of_2(num_experts))  # (no layouts narrower than a warp's)
    sorted_pairs = torch.empty(num_tiles * block_m, dtype=torch.int32, device=device)
    tile_expert = torch.empty(num_tiles, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    chunks = max(cdiv(num_pairs, chunk), 1)
    counts = num_padded  # (not read with one chunk)
    if chunks > 1:
        counts = torch.empty(chunks, e_pow2, dtype=torch.int32, device=device)
        _expert_count_kernel[(chunks,)](flat, counts, num_pairs, CHUNK=chunk, E_POW2=e_pow2)
    _align_pairs_kernel[(chunks,)](
        flat, counts, sorted_pairs, tile_expert, num_padded, num_pairs, num_experts, num_tiles,
        COUNTED=chunks > 1, BLOCK_M=block_m, CHUNK=chunk,
        SUB=min(chunk, max(16, min(64, 8192 // e_pow2))), ROWS=max(1, 4096 // e_pow2),
        TILES=max(4, min(32, 4096 // e_pow2)), E_POW2=e_pow2, num_warps=4,
    )  # fmt: skip
    return sorted_pairs, tile_expert, num_padded
