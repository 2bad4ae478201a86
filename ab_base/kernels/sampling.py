"""Sampling a token per row (Triton): temperature, min-p, top-k and top-p without a sort.

A row's draw is the exponential race over the tokens it keeps: the argmax of
``p_i / q_i`` with ``q_i ~ Exp(1)``, ``q_i = -log(u_i)``, ``u_i`` Philox-uniform for (row
seed, token id). The kept set is every token with logit >= a floor (the row's top-k
threshold, and min-p: ``p_i >= min_p * p_max``) whose more probable kept tokens hold less
than ``top_p`` of the kept mass. Top-p needs no sort: the race is run over the floor's set;
while its winner's strictly more probable tokens hold ``top_p`` of the mass or more, the
winner and everything below it are out, and the race is run again, with the same variates,
over what is strictly above: the winner among the nucleus is the winner of the race
restricted to it, an exact draw from the renormalised distribution. Each round is one pass
over the row; the winner's rank shrinks geometrically, ~2 passes for top_p 0.95.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _uniforms(seed, start, BLOCK: tl.constexpr):
    """Tokens start .. start + BLOCK - 1's uniforms: token t is lane t % 4 of Philox
    counter t // 4 (one Philox call per four tokens; ``start`` a multiple of 4).
    NOTE: ``tl.rand`` stays below 1 (at most 1 - 2**-23), so q > 0: a q of 0 would win for
    any kept token whatever its probability; u = 0 is q = inf, a token that cannot win."""
    u0, u1, u2, u3 = tl.rand4x(seed, start // 4 + tl.arange(0, BLOCK // 4))
    return tl.reshape(tl.join(tl.join(u0, u1), tl.join(u2, u3)), [BLOCK])


@triton.jit
def _exp_race_key(s, seed, start, BLOCK: tl.constexpr):
    """log(p / q) up to the row's constant: ``s`` = (logit - max) / temperature."""
    return s - tl.log(-tl.log(_uniforms(seed, start, BLOCK)))


@triton.jit
def _sample_kernel(
    logits_ptr,  # [rows, vocab], any float dtype
    params_ptr,  # [rows, 4] fp32: temperature (0: greedy), top_p, min_p, top-k floor (logit)
    seeds_ptr,  # [rows] int64: the row's Philox key this step
    out_ptr,  # [rows] int64
    stride_row,
    VOCAB: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    temperature = tl.load(params_ptr + row * 4)
    top_p = tl.load(params_ptr + row * 4 + 1)
    min_p = tl.load(params_ptr + row * 4 + 2)
    floor = tl.load(params_ptr + row * 4 + 3)
    seed = tl.load(seeds_ptr + row)
    offs = tl.arange(0, BLOCK)

    # pass 1: the row's largest logit and its first index (greedy's answer)
    best = -float("inf")
    best_i = 0
    for start in range(0, VOCAB, BLOCK):
        x = tl.load(base + start + offs, mask=start + offs < VOCAB, other=-float("inf"))
        x = x.to(tl.float32)
        m = tl.max(x, 0)
        best_i = tl.where(m > best, start + tl.argmax(x, 0), best_i)
        best = tl.maximum(best, m)

    winner = best_i
    if temperature > 0 and best > -float("inf"):  # (no finite logit: token 0, as argmax)
        inv_t = 1.0 / temperature
        # pass 2: the kept mass and the race over every kept token
        total = 0.0
        win_key = -float("inf")
        for start in range(0, VOCAB, BLOCK):
            idx = start + offs
            x = tl.load(base + idx, mask=idx < VOCAB, other=-float("inf")).to(tl.float32)
            s = (x - best) * inv_t
            e = tl.exp(s)
            kept = (x >= floor) & (e >= min_p) & (e > 0)
            if tl.max(kept.to(tl.int32), 0) > 0:  # (Philox only where a token is kept)
                total += tl.sum(tl.where(kept, e, 0.0), 0)
                key = tl.where(kept, _exp_race_key(s, seed, start, BLOCK), -float("inf"))
                k = tl.max(key, 0)
                winner = tl.where(k > win_key, start + tl.argmax(key, 0), winner)
                win_key = tl.maximum(win_key, k)
        # top-p rounds: is the winner in the nucleus? If not, race over what is above it
        searching = top_p < 1.0
        while searching:
            pivot = tl.load(base + winner).to(tl.float32)
            above = 0.0
            win_key = -float("inf")
            next_winner = winner
            for start in range(0, VOCAB, BLOCK):
                idx = start + offs
                x = tl.load(base + idx, mask=idx < VOCAB, other=-float("inf")).to(tl.float32)
                s = (x - best) * inv_t
                e = tl.exp(s)
                over = (x > pivot) & (x >= floor) & (e >= min_p) & (e > 0)
                if tl.max(over.to(tl.int32), 0) > 0:
                    above += tl.sum(tl.where(over, e, 0.0), 0)
                    key = tl.where(over, _exp_race_key(s, seed, start, BLOCK), -float("inf"))
                    k = tl.max(key, 0)
                    next_winner = tl.where(k > win_key, start + tl.argmax(key, 0), next_winner)
                    win_key = tl.maximum(win_key, k)
            # (above == 0: the winner ties the best, kept even when top_p * total underflows)
            searching = (above > 0) & (above >= top_p * total)
            winner = tl.where(searching, next_winner, winner)
    tl.store(out_ptr + row, winner.to(tl.int64))


@triton.jit
def _uniforms_kernel(seeds_ptr, out_ptr, VOCAB: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    seed = tl.load(seeds_ptr + row)
    offs = tl.arange(0, BLOCK)
    for start in range(0, VOCAB, BLOCK):
        idx = start + offs
        tl.store(out_ptr + row * VOCAB + idx, _uniforms(seed, start, BLOCK), mask=idx < VOCAB)


def sample_rows(
    logits: torch.Tensor,  # [rows, vocab]
    params: torch.Tensor,  # [rows, 4] fp32: temperature, top_p, min_p, top-k floor
    seeds: torch.Tensor,  # [rows] int64
    block: int = 2048,
    num_warps: int = 8,
) -> torch.Tensor:  # [rows] int64
    """One token per row (see the module's docstring); greedy rows (temperature 0) take
    the first largest logit. A row keeps the tokens with logit >= its floor (-inf: all)."""
    rows, vocab = logits.shape
    assert logits.stride(1) == 1, "logits need a dense last dim"
    assert params.shape == (rows, 4) and params.dtype == torch.float32, (
        f"params {tuple(params.shape)} {params.dtype}, want ({rows}, 4) float32"
    )
    assert seeds.shape == (rows,) and seeds.dtype == torch.int64, f"seeds {seeds.dtype}"
    assert vocab < 2**31, f"vocabulary {vocab} >= 2**31"
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows:
        _sample_kernel[(rows,)](
            logits, params.contiguous(), seeds.contiguous(), out, logits.stride(0),
            VOCAB=vocab, BLOCK=block, num_warps=num_warps,
        )  # fmt: skip
    return out


def race_uniforms(seeds: torch.Tensor, vocab: int) -> torch.Tensor:  # [rows] -> [rows, vocab]
    """The uniforms ``sample_rows`` draws for these seeds (for the reference and tests)."""
    out = torch.empty(seeds.shape[0], vocab, dtype=torch.float32, device=seeds.device)
    if seeds.shape[0]:
        _uniforms_kernel[(seeds.shape[0],)](seeds.contiguous(), out, VOCAB=vocab, BLOCK=1024)
    return out
