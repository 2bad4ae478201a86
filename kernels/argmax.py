"""The first largest logit of each of a few rows (Triton), in one launch: greedy sampling.

torch reduces a lone row in one thread block (H200, one 128256-wide row: 26 us), and a
two-stage reduction in torch ops is five kernels. Here a row is split over up to MAX_PARTS
programs; each writes its part's largest value, the first index holding it and its first NaN's
index, then counts itself in (an atomic add). The row's last program to arrive reduces the
parts, writes the id and sets the count back to 0 for the next launch: no program waits for
another, so any number may be in flight. NaN counts as the largest value, as in torch.argmax.
"""

import torch
import triton
import triton.language as tl

from kernels.launch import next_power_of_2

MAX_PARTS = 64
MAX_ROWS = 16  # the callers' count buffers: more rows go to torch's argmax (one block a row)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # exact in fp32 (not fp64 or ints)


@triton.jit
def _argmax_kernel(
    x_ptr,  # [rows, vocab] fp32 / fp16 / bf16, dense last dim
    out_ptr,  # [rows] int64
    part_ptr,  # [rows, 3, PARTS] int32: each part's max (fp32 bits), first index, first NaN
    count_ptr,  # [>= rows] int32, zeros before and after
    vocab,
    stride_x,
    part_len,  # a multiple of BLOCK; parts * part_len covers the row, each part holds some
    parts,
    BLOCK: tl.constexpr,
    PARTS: tl.constexpr,  # a power of two >= parts
):
    row = tl.program_id(0)
    part = tl.program_id(1)
    base = x_ptr + row.to(tl.int64) * stride_x
    lo = part * part_len
    offs = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], -float("inf"), tl.float32)
    best_i = tl.full([BLOCK], vocab, tl.int32)
    nan_i = tl.full([BLOCK], vocab, tl.int32)
    for start in range(lo, lo + part_len, BLOCK):
        idx = start + offs
        x = tl.load(base + idx, mask=idx < vocab, other=-float("inf")).to(tl.float32)
        nan_i = tl.minimum(nan_i, tl.where(x != x, idx, vocab))
        better = x > best  # strict: each lane keeps its first maximum (NaN never compares)
        best_i = tl.where(better, idx, best_i)
        best = tl.where(better, x, best)
    top = tl.max(best, 0)
    # A part of -inf only (no lane ever improved) holds its first maximum at ``lo``.
    first = tl.min(tl.where((best == top) & (best_i < vocab), best_i, vocab), 0)
    first = tl.where(first < vocab, first, lo)
    slot = part_ptr + row.to(tl.int64) * (3 * PARTS)
    tl.store(slot + part, top.to(tl.int32, bitcast=True))
    tl.store(slot + PARTS + part, first)
    tl.store(slot + 2 * PARTS + part, tl.min(nan_i, 0))
    tl.debug_barrier()  # every thread's stores before the release
    arrived = tl.atomic_add(count_ptr + row, 1, sem="acq_rel", scope="gpu")
    if arrived == parts - 1:  # the last part of the row: all the others' stores are visible
        tl.debug_barrier()
        j = tl.arange(0, PARTS)
        mine = j < parts
        tops = tl.load(slot + j, mine, -8388608, cache_modifier=".cg")  # (-inf's bits)
        tops = tops.to(tl.float32, bitcast=True)
        firsts = tl.load(slot + PARTS + j, mine, vocab, cache_modifier=".cg")
        nans = tl.load(slot + 2 * PARTS + j, mine, vocab, cache_modifier=".cg")
        first_nan = tl.min(nans, 0)
        top = tl.max(tops, 0)
        first = tl.min(tl.where(tops == top, firsts, vocab), 0)
        tl.store(out_ptr + row, tl.where(first_nan < vocab, first_nan, first).to(tl.int64))
        tl.store(count_ptr + row, 0)


def argmax_rows(
    logits: torch.Tensor,  # [rows, vocab], rows <= MAX_ROWS
    counts: torch.Tensor,  # [>= rows] int32 zeros, left zeros; one launch at a time uses it
    block: int = 1024,
    parts: int | None = None,  # programs a row (1 to MAX_PARTS); None: as many as fit
) -> torch.Tensor:  # [rows] int64
    """``logits.argmax(dim=-1)`` in one launch: each row's first largest value (NaN the
    largest). ``counts`` is the caller's, reused launch after launch on one stream."""
    rows, vocab = logits.shape
    assert 0 < rows <= MAX_ROWS, f"{rows} rows: 1 to {MAX_ROWS}"
    assert logits.stride(1) == 1, "logits need a dense last dim"
    assert logits.dtype in DTYPES, f"logits {logits.dtype}: one of {DTYPES}"
    assert 0 < vocab < 2**31, f"vocabulary {vocab}: 1 to 2**31 - 1"
    assert counts.dtype == torch.int32 and counts.numel() >= rows, (
        f"counts {counts.dtype} {tuple(counts.shape)}: int32, {rows} or more"
    )
    assert counts.device == logits.device, f"counts on {counts.device}, logits {logits.device}"
    wanted = MAX_PARTS if parts is None else parts
    assert 1 <= wanted <= MAX_PARTS, f"parts {wanted}: 1 to {MAX_PARTS}"
    part_len = triton.cdiv(triton.cdiv(vocab, wanted), block) * block
    n = triton.cdiv(vocab, part_len)  # (each part holds some of the row)
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    scratch = torch.empty(rows, 3 * MAX_PARTS, dtype=torch.int32, device=logits.device)
    _argmax_kernel[(rows, n)](
        logits, out, scratch, counts, vocab, logits.stride(0), part_len, n,
        BLOCK=block, PARTS=max(next_power_of_2(n), 2), num_warps=4,
    )  # fmt: skip
    return out
