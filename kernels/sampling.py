"""Sampling a token per row (Triton): temperature, min-p, top-k and top-p without a sort.

A row's draw is the exponential race over the tokens it keeps: the argmax of
``p_i / q_i`` with ``q_i ~ Exp(1)``, ``q_i = -log(u_i)``, ``u_i`` Philox-uniform for (row
seed, token id). The kept set is every token with logit >= the row's k-th largest (found
by a radix select) and ``p_i >= min_p * p_max``, whose more probable kept tokens hold less
than ``top_p`` of the kept mass. Top-p needs no sort: the race is run over the first two
sets; while its winner's strictly more probable tokens hold ``top_p`` of the mass or more, the
winner and everything below it are out, and the race is run again, with the same variates,
over what is strictly above: the winner among the nucleus is the winner of the race
restricted to it, an exact draw from the renormalised distribution. Each round is one pass
over the row; the winner's rank shrinks geometrically, ~2 passes for top_p 0.95.

A few rows leave most SMs idle while one program per row makes those passes alone (~0.15
ms for a 128256-token row on an H200). Then a row is split over SPLIT programs, each
making every pass over its own part; after a pass they exchange their partials (largest
logit, mass, race winner, top-k histogram) through global memory and a barrier, and each
reduces them in the same order, so all go on from the same values (see ``split_for``).
"""

import functools
import os

import torch
import triton
import triton.language as tl


@triton.jit
def _uniforms(seed, start, BLOCK: tl.constexpr):
    """Tokens start .. start + BLOCK - 1's uniforms: token t is lane t % 4 of Philox
    counter t // 4 (one Philox call per four tokens; ``start`` a multiple of 4).
    NOTE: ``tl.rand`` stays below 1 (at most 1 - 2**-23), so q > 0: a q of 0 would win for
    any kept token whatever its probability. A 0 becomes 2**-32 (q = 22: a token that all
    but never wins, as at q = inf), so every kept token's key is finite."""
    u0, u1, u2, u3 = tl.rand4x(seed, start // 4 + tl.arange(0, BLOCK // 4))
    u = tl.reshape(tl.join(tl.join(u0, u1), tl.join(u2, u3)), [BLOCK])
    return tl.maximum(u, 2.3283064365386963e-10)


@triton.jit
def _race(base, lo, part_len, best, inv_t, floor, min_p, pivot, seed, VOCAB: tl.constexpr,
          BLOCK: tl.constexpr):  # fmt: skip
    """Over the kept tokens lo .. lo + part_len - 1 with logit > ``pivot``: their mass, the
    race's best key and its winner (VOCAB: none). Per-lane running sums and bests, one
    reduction at the end."""
    offs = tl.arange(0, BLOCK)
    mass = tl.zeros([BLOCK], tl.float32)
    top = tl.full([BLOCK], -float("inf"), tl.float32)
    top_i = tl.zeros([BLOCK], tl.int32)
    for start in range(lo, lo + part_len, BLOCK):
        idx = start + offs
        x = tl.load(base + idx, mask=idx < VOCAB, other=-float("inf")).to(tl.float32)
        s = (x - best) * inv_t  # log(p / p_max)
        e = tl.exp(s)
        member = (x > pivot) & (x >= floor) & (e >= min_p) & (e > 0)
        mass += tl.where(member, e, 0.0)
        q = -tl.log(_uniforms(seed, start, BLOCK))
        key = tl.where(member, s - tl.log(q), -float("inf"))
        better = key > top
        top_i = tl.where(better, idx, top_i)
        top = tl.where(better, key, top)
    k = tl.max(top, 0)
    return tl.sum(mass, 0), k, tl.min(tl.where((top == k) & (top > -float("inf")), top_i, VOCAB), 0)


@triton.jit
def _arrive_and_wait(sync_ptr, target):
    """A barrier of a row's programs: count this one in once its partials are written
    (release), then wait until ``target`` are counted (acquire). The count starts at 0."""
    tl.debug_barrier()
    tl.atomic_add(sync_ptr, 1, sem="release", scope="gpu")
    while tl.load(sync_ptr, volatile=True) < target:
        pass
    tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _exchange(scratch, sync_ptr, n, part, split, key, mass, index, VOCAB: tl.constexpr,
              MAX_SPLIT: tl.constexpr):  # fmt: skip
    """The row's exchange n (from 0) between its ``split`` programs: each publishes its
    part's largest key, mass and the first index holding that key, and all return the
    row's: the largest key, the summed mass (in part order, so the same sum in each) and
    the first index among the parts with that key. Slots alternate: exchange n + 2 reuses
    n's only after all have arrived at n + 1, so after all have read n. (.cg: from L2,
    never from a stale L1 line of exchange n - 2.)"""
    slot = scratch + (n % 2) * (3 * MAX_SPLIT)
    tl.store(slot + part, key.to(tl.int32, bitcast=True))
    tl.store(slot + MAX_SPLIT + part, mass.to(tl.int32, bitcast=True))
    tl.store(slot + 2 * MAX_SPLIT + part, index)
    _arrive_and_wait(sync_ptr, (n + 1) * split)
    j = tl.arange(0, MAX_SPLIT)
    mine = j < split
    keys = tl.load(slot + j, mine, -8388608, cache_modifier=".cg")  # (-inf's bits)
    keys = keys.to(tl.float32, bitcast=True)
    masses = tl.load(slot + MAX_SPLIT + j, mine, 0, cache_modifier=".cg")
    indices = tl.load(slot + 2 * MAX_SPLIT + j, mine, VOCAB, cache_modifier=".cg")
    key = tl.max(keys, 0)
    index = tl.min(tl.where(keys == key, indices, VOCAB), 0)
    return key, tl.sum(masses.to(tl.float32, bitcast=True), 0), index


@triton.jit
def _race_row(base, lo, best, inv_t, floor, min_p, pivot, seed, scratch, sync_ptr, n, part,
              split, part_len, VOCAB: tl.constexpr, BLOCK: tl.constexpr,
              MAX_SPLIT: tl.constexpr):  # fmt: skip
    """``_race`` over the whole row: its mass and winner (and the next exchange's number)."""
    mass, key, winner = _race(base, lo, part_len, best, inv_t, floor, min_p, pivot, seed, VOCAB,
                              BLOCK)  # fmt: skip
    if split > 1:  # (a part's winner without a kept token is VOCAB already)
        key, mass, winner = _exchange(scratch, sync_ptr, n, part, split, key, mass, winner,
                                      VOCAB, MAX_SPLIT)  # fmt: skip
        n += 1
    return mass, winner, n


@triton.jit
def _order_key(x):
    """fp32 -> int32 whose signed order is the floats' order (and back: its own inverse)."""
    b = x.to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def _kth_largest(base, lo, part_len, k, hists, sync_ptr, n, part, split, VOCAB: tl.constexpr,
                 BLOCK: tl.constexpr, ROUNDS: tl.constexpr, MAX_SPLIT: tl.constexpr):  # fmt: skip
    """The row's k-th largest logit (0 < k < VOCAB) by radix select: a histogram of 8 bits
    of the order key a pass, from the top, among the keys that share the bits found so far
    (2 passes cover bf16's 16 bits, 4 fp16 / fp32); split rows add up their parts'
    histograms. NaN ranks as -inf: its order key (of either sign) lay above +inf's or below
    -inf's, and a k-th largest of NaN kept no token. Returns it and the next exchange."""
    offs = tl.arange(0, BLOCK)
    bins = tl.arange(0, 256)
    hi = 0  # the k-th largest's order key >> the pass's shift + 8, so far
    rest = k  # how many of the k largest share those bits
    for r in tl.static_range(ROUNDS):
        hist = tl.zeros([256], tl.int32)
        for start in range(lo, lo + part_len, BLOCK):
            idx = start + offs
            x = tl.load(base + idx, mask=idx < VOCAB, other=0.0).to(tl.float32)
            key = _order_key(tl.where(x == x, x, -float("inf")))
            if r == 0:
                hist += tl.histogram((key >> 24) + 128, 256, mask=idx < VOCAB)
            else:
                shared = (idx < VOCAB) & ((key >> (32 - 8 * r)) == hi)
                hist += tl.histogram((key >> (24 - 8 * r)) & 0xFF, 256, mask=shared)
        if split > 1:  # (slots alternate as _exchange's)
            slot = hists + (n % 2) * (MAX_SPLIT * 256)
            tl.store(slot + part * 256 + bins, hist)
            _arrive_and_wait(sync_ptr, (n + 1) * split)
            n += 1
            j = tl.arange(0, MAX_SPLIT)[:, None]
            parts = tl.load(slot + j * 256 + bins[None, :], j < split, 0, cache_modifier=".cg")
            hist = tl.sum(parts, 0)
        at_or_above = tl.cumsum(hist, 0, reverse=True)
        b = tl.max(tl.where(at_or_above >= rest, bins, -1), 0)
        rest -= tl.sum(tl.where(bins == b, at_or_above - hist, 0), 0)
        hi = b - 128 if r == 0 else hi * 256 + b
    if ROUNDS == 2:  # (a bf16 value's low 16 bits are 0: its key's, 0 or all 1 if negative)
        hi = (hi << 16) | tl.where(hi < 0, 0xFFFF, 0)
    return _order_key(hi).to(tl.float32, bitcast=True), n


# NOTE: one compile per logits dtype: the split and the params' and seeds' layouts are not
# specialized on (the Sampler's start-up launch passes fresh tensors, its steps views of one
# staged [rows, 3] int64 tensor: params 8 bytes in, strides 6 and 3), so start-up compiles
# the kernel the steps run
@triton.jit(
    do_not_specialize=["split", "part_len", "stride_scratch", "stride_params", "stride_seeds"],
    do_not_specialize_on_alignment=["params_ptr", "seeds_ptr"],
)
def _sample_kernel(
    logits_ptr,  # [rows, vocab], any float dtype
    params_ptr,  # [rows, 4] fp32: temperature (0: greedy), top_p, min_p, top_k (0: off)
    seeds_ptr,  # [rows] int64: the row's Philox key this step
    out_ptr,  # [rows] int64
    scratch_ptr,  # [rows, SCRATCH_WORDS] int32: exchanged partials (split > 1)
    sync_ptr,  # [rows] int32, zeros: the row's arrivals (split > 1)
    stride_row,
    stride_scratch,
    stride_params,
    stride_seeds,
    split,  # programs per row (not a constant: one compiled kernel for every batch)
    part_len,  # tokens per program, a multiple of BLOCK
    VOCAB: tl.constexpr,
    BLOCK: tl.constexpr,
    KEY_ROUNDS: tl.constexpr,  # the top-k radix select's passes: 2 for bf16, else 4
    MAX_SPLIT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    lo = part * part_len
    base = logits_ptr + row * stride_row
    scratch = scratch_ptr + row * stride_scratch
    hists = scratch + 6 * MAX_SPLIT
    sync = sync_ptr + row
    n = part * 0  # the row's next exchange
    temperature = tl.load(params_ptr + row * stride_params)
    top_p = tl.load(params_ptr + row * stride_params + 1)
    min_p = tl.load(params_ptr + row * stride_params + 2)
    top_k = tl.load(params_ptr + row * stride_params + 3).to(tl.int32)
    seed = tl.load(seeds_ptr + row * stride_seeds)
    offs = tl.arange(0, BLOCK)

    # the row's largest logit and its first index (greedy's answer; token 0 for a row of
    # -inf, as argmax)
    top = tl.full([BLOCK], -float("inf"), tl.float32)
    top_i = tl.zeros([BLOCK], tl.int32)
    for start in range(lo, lo + part_len, BLOCK):
        x = tl.load(base + start + offs, mask=start + offs < VOCAB, other=-float("inf"))
        better = x.to(tl.float32) > top
        top_i = tl.where(better, start + offs, top_i)
        top = tl.where(better, x.to(tl.float32), top)
    best = tl.max(top, 0)
    winner = tl.min(tl.where(top == best, top_i, VOCAB), 0)
    if split > 1:
        best, _, winner = _exchange(scratch, sync, n, part, split, best, best, winner, VOCAB,
                                    MAX_SPLIT)  # fmt: skip
        n += 1

    # (a row with +inf logits, which no distribution gives, takes its first one, as argmax)
    if (temperature > 0) & (best > -float("inf")) & (best < float("inf")):
        inv_t = 1.0 / temperature
        floor = -float("inf")
        if (top_k > 0) & (top_k < VOCAB):  # every token tied with the k-th is kept
            floor, n = _kth_largest(base, lo, part_len, top_k, hists, sync, n, part, split,
                                    VOCAB, BLOCK, KEY_ROUNDS, MAX_SPLIT)  # fmt: skip
        # the race over every kept token (the best one among them: a winner always)
        total, winner, n = _race_row(base, lo, best, inv_t, floor, min_p, -float("inf"), seed,
                                     scratch, sync, n, part, split, part_len, VOCAB, BLOCK,
                                     MAX_SPLIT)  # fmt: skip
        # top-p rounds: is the winner in the nucleus? If not, race over what is above it
        searching = top_p < 1.0
        while searching:
            pivot = tl.load(base + winner).to(tl.float32)
            above, next_winner, n = _race_row(base, lo, best, inv_t, floor, min_p, pivot, seed,
                                              scratch, sync, n, part, split, part_len, VOCAB,
                                              BLOCK, MAX_SPLIT)  # fmt: skip
            # (above == 0: the winner ties the best, kept even when top_p * total underflows)
            searching = (above > 0) & (above >= top_p * total)
            winner = tl.where(searching, next_winner, winner)
    tl.store(out_ptr + row, winner.to(tl.int64), mask=part == 0)


@triton.jit
def _uniforms_kernel(seeds_ptr, out_ptr, VOCAB: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    seed = tl.load(seeds_ptr + row)
    offs = tl.arange(0, BLOCK)
    for start in range(0, VOCAB, BLOCK):
        idx = start + offs
        tl.store(out_ptr + row * VOCAB + idx, _uniforms(seed, start, BLOCK), mask=idx < VOCAB)


MAX_SPLIT = 32
SCRATCH_WORDS = 2 * (3 + 256) * MAX_SPLIT  # a split row's: 2 slots of 3 partials, of histograms


def split_for(rows: int, vocab: int, block: int, programs: int) -> int:
    """Programs per row: the largest power of two up to MAX_SPLIT with ``rows * split <=
    programs`` and a tile or more per program; 1 for a batch that fills the card. The
    programs of a row wait for each other, so all of them must be resident at once: the
    launcher allows half the card's SMs (one program each at most), and the interpreter,
    which runs programs one after another, one. H200, Llama 3's vocabulary, top_p 0.95
    (sampler_probe.py): 1 / 4 / 16 rows 0.125 / 0.130 / 0.177 ms unsplit, 0.043 / 0.075 /
    0.059 ms split 32 / 16 / 4 (8-32 within 10% of each other at one row)."""
    split = 1
    while split < MAX_SPLIT and rows * split * 2 <= programs and split * 2 * block <= vocab:
        split *= 2
    return split


@functools.cache
def _programs(device: torch.device) -> int:
    """How many programs may wait for each other at once (see ``split_for``); 1 with
    ``VLLM_RUNNER_SAMPLE_SPLIT=0`` (say, under MPS with fewer SMs than the card reports)."""
    if device.type != "cuda" or os.environ.get("VLLM_RUNNER_SAMPLE_SPLIT", "1") == "0":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count // 2


def sample_rows(
    logits: torch.Tensor,  # [rows, vocab]
    params: torch.Tensor,  # [rows, 4] fp32: temperature, top_p, min_p, top_k
    seeds: torch.Tensor,  # [rows] int64
    block: int = 2048,
    num_warps: int = 16,
    split: int | None = None,  # programs per row (1 to MAX_SPLIT); None: split_for's
) -> torch.Tensor:  # [rows] int64
    """One token per row (see the module's docstring); greedy rows (temperature 0) take
    the first largest logit. top_k 0 or >= the vocabulary keeps every token. The tile:
    H200, Llama 3's vocabulary, top_p 0.95, 2048 x 16 warps took 0.124 / 0.176 / 0.289 ms
    at 1 / 64 / 256 rows against 0.155 / 0.222 / 0.341 with 8 warps (sampler_probe.py,
    two runs alike), the best or within 5% of it at every row count (one program a row)."""
    rows, vocab = logits.shape
    assert logits.stride(1) == 1, "logits need a dense last dim"
    assert params.shape == (rows, 4) and params.dtype == torch.float32, (
        f"params {tuple(params.shape)} {params.dtype}, want ({rows}, 4) float32"
    )
    assert params.stride(1) == 1, "params need a dense last dim"
    assert seeds.shape == (rows,) and seeds.dtype == torch.int64, (
        f"seeds {tuple(seeds.shape)} {seeds.dtype}, want ({rows},) int64"
    )
    assert vocab < 2**31, f"vocabulary {vocab} >= 2**31"
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if not rows:
        return out
    programs = _programs(logits.device)
    split = split_for(rows, vocab, block, programs) if split is None else split
    assert 1 <= split <= MAX_SPLIT and (split == 1 or rows * split <= programs), (
        f"split {split} x {rows} rows: 1 to {MAX_SPLIT} a row and {programs} programs at most "
        "at once (the interpreter: 1)"
    )
    part_len = triton.cdiv(triton.cdiv(vocab, split), block) * block
    # (one program a row reads neither: placeholders of the same dtype, for one compile)
    scratch = torch.empty(rows if split > 1 else 1, SCRATCH_WORDS if split > 1 else 1,
                          dtype=torch.int32, device=out.device)  # fmt: skip
    sync = torch.zeros(rows, dtype=torch.int32, device=out.device) if split > 1 else scratch
    _sample_kernel[(rows, split)](
        logits, params, seeds, out, scratch, sync, logits.stride(0), scratch.stride(0),
        params.stride(0), seeds.stride(0), split, part_len, VOCAB=vocab, BLOCK=block,
        KEY_ROUNDS=2 if logits.dtype == torch.bfloat16 else 4, MAX_SPLIT=MAX_SPLIT,
        num_warps=num_warps,
    )  # fmt: skip
    return out


@triton.jit
def _kth_largest_kernel(
    logits_ptr, ks_ptr, out_ptr, stride_row, VOCAB: tl.constexpr, BLOCK: tl.constexpr,
    KEY_ROUNDS: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    k = tl.load(ks_ptr + row)
    floor, _ = _kth_largest(logits_ptr + row * stride_row, 0, VOCAB, k, out_ptr, out_ptr, 0, 0,
                            1, VOCAB, BLOCK, KEY_ROUNDS, 1)  # fmt: skip
    tl.store(out_ptr + row, floor)


def kth_largest(logits: torch.Tensor, ks: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """Each row's ks[row]-th largest logit (0 < k < vocab), by ``sample_rows``' radix
    select (for tests)."""
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _kth_largest_kernel[(rows,)](
            logits, ks.to(logits.device, torch.int32).contiguous(), out, logits.stride(0),
            VOCAB=vocab, BLOCK=block, KEY_ROUNDS=2 if logits.dtype == torch.bfloat16 else 4,
        )  # fmt: skip
    return out


def race_uniforms(seeds: torch.Tensor, vocab: int) -> torch.Tensor:  # [rows] -> [rows, vocab]
    """The uniforms ``sample_rows`` draws for these seeds (for the reference and tests)."""
    out = torch.empty(seeds.shape[0], vocab, dtype=torch.float32, device=seeds.device)
    if seeds.shape[0]:
        _uniforms_kernel[(seeds.shape[0],)](seeds.contiguous(), out, VOCAB=vocab, BLOCK=1024)
    return out
