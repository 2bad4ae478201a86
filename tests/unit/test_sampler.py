"""The sampler on crafted logits: top-k ties, top_p 1 in a filtering batch, a top_p under
fp32's range, and seeds that differ only above 32 bits (each found in review)."""

import math

import torch

from vllm_runner.sample.rows import SamplingRow
from vllm_runner.sample.sampler import Sampler, apply_top_k_top_p_min_p
from vllm_runner.sampling_params import SamplingParams


def _row(seed=None, output_len=0, **kw):
    params = SamplingParams(**{"temperature": 1.0, **kw})
    return SamplingRow(params, [1] * (1 + output_len), 1, seed)


def test_top_k_keeps_every_token_tied_with_the_kth():
    """vLLM and HF cut below the k-th largest logit, so tokens of equal logit get equal
    probability; a cut at rank k kept some of a tie (here token 5 had none)."""
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0, 1.0, 2.0]])
    for k in (2, 3):
        probs = apply_top_k_top_p_min_p(logits.clone(), [_row(top_k=k)]).softmax(-1)
        torch.testing.assert_close(probs, torch.tensor([[0.0, 1, 0, 1, 0, 1]]) / 3)
    probs = apply_top_k_top_p_min_p(logits.clone(), [_row(top_k=4)]).softmax(-1)
    assert (probs[0, 2] == probs[0, 4]) and probs[0, 0] == 0  # the tie at the 4th: both
    # k past the vocabulary, with another row filtering: nothing cut
    out = apply_top_k_top_p_min_p(logits.repeat(2, 1), [_row(top_k=10**12), _row(top_k=1)])
    assert torch.equal(out[0], logits[0])


def test_top_p_keeps_a_tie_at_its_cut_whole():
    """The cut is by value, as the GPU kernel's: token 0 holds 0.68 of the mass and the
    three tied tokens 0.09 each; top_p 0.75 keeps token 0 and all three (a cut by rank
    kept whichever of them the sort put first)."""
    logits = torch.tensor([[1.0, 3.0, 1.0, -2.0, 1.0, 0.0]])
    out = apply_top_k_top_p_min_p(logits.clone(), [_row(top_p=0.75)])
    assert out.isfinite().tolist() == [[True, True, True, False, True, False]]
    out = apply_top_k_top_p_min_p(logits.clone(), [_row(top_p=0.6)])
    assert out.isfinite().tolist() == [[False, True, False, False, False, False]]


def _kept_fp64(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """What top-k then top-p keep, by value, from a full sort in fp64."""
    x = logits.double()
    if 0 < top_k < x.shape[0]:
        x = x.masked_fill(x < x.sort(descending=True).values[top_k - 1], -math.inf)
    if top_p < 1.0:
        s = x.sort(descending=True).values
        probs = (s - x.logsumexp(0)).exp()
        last = int(((probs.cumsum(0) - probs) < top_p).sum()) - 1
        x = x.masked_fill(x < s[max(last, 0)], -math.inf)
    return x.isfinite()


def test_cpu_cuts_from_candidates_match_a_full_sort():
    """The CPU path cuts from ``topk`` candidates, and sorts a row whose nucleus may reach
    past them: the kept tokens are a full sort's, for peaked and flat rows (a nucleus of
    most of the row), ties (logits on a 0.25 grid) and top-k with top-p."""
    gen = torch.Generator().manual_seed(0)
    peaked = (torch.randn(6, 3000, generator=gen) * 3 * 4).round() / 4
    flat = (torch.randn(6, 3000, generator=gen) * 0.3 * 4).round() / 4
    for logits in (peaked, flat):
        for top_k, top_p in ((0, 0.9), (0, 0.3), (50, 0.8), (1000, 0.95), (7, 1.0), (0, 0.999)):
            rows = [_row(top_k=top_k, top_p=top_p)] * len(logits)
            got = apply_top_k_top_p_min_p(logits.clone(), rows).isfinite()
            for i in range(len(logits)):
                want = _kept_fp64(logits[i], top_k, top_p)
                counts = int(got[i].sum()), int(want.sum())
                assert torch.equal(got[i], want), (top_k, top_p, i, counts)
    assert apply_top_k_top_p_min_p(flat.clone(), [_row(top_p=0.9)] * 6).isfinite().sum() > 1000


def test_cpu_candidate_cuts_at_the_256th_candidate_in_a_mixed_batch():
    """Cuts around the 256th ``topk`` candidate, where the CPU path either stops or sorts
    the row: a tie of 31 logits straddles it, top_p lands before, in and past the tie (with
    and without top-k). The batch mixes those rows with rows that skip top-p, have fewer
    finite logits than candidates or none, or a vocabulary under 256; each row is a full
    fp64 sort's, and the same alone as in the batch."""
    gen = torch.Generator().manual_seed(0)
    tied = torch.linspace(10, 0, 600)
    tied[250:281] = tied[250]
    probs = tied.double().softmax(0)  # (ranked: tied is descending)
    before = probs.cumsum(0) - probs
    cases = [
        (tied, k, float(before[i : i + 2].mean())) for i in range(240, 295, 3) for k in (0, 300)
    ]
    few = torch.randn(600, generator=gen).masked_fill(torch.arange(600) >= 40, -math.inf)
    none = torch.full((600,), -math.inf)
    cases += [(few, 0, 0.999), (few, 20, 0.9), (none, 0, 0.5), (tied, 260, 1.0), (tied, 0, 1.0)]
    for rows in (
        cases,
        [(torch.randn(100, generator=gen), k, p) for k, p in ((0, 0.95), (9, 0.5))],
    ):
        order = torch.randperm(len(rows[0][0]), generator=gen)  # ties spread over the row
        logits = torch.stack([x[order] + i for i, (x, _, _) in enumerate(rows)])  # (rows differ)
        params = [_row(top_k=k, top_p=p) for _, k, p in rows]
        got = apply_top_k_top_p_min_p(logits.clone(), params)
        for i, (_, k, p) in enumerate(rows):
            assert torch.equal(got[i].isfinite(), _kept_fp64(logits[i], k, p)), (i, k, p)
            alone = apply_top_k_top_p_min_p(logits[i : i + 1].clone(), [params[i]])
            assert torch.equal(alone[0].isfinite(), got[i].isfinite()), (i, k, p)


def test_top_p_1_cuts_nothing_whatever_else_is_in_the_batch():
    """A row with top_p=1 (off, as vLLM) next to a row that filters: the fp32 cumulative sum
    of its many small probabilities rounds up to 1 before its end and cut thousands of
    tokens (here ~2e-4 of its mass) that it keeps when alone."""
    vocab, tail = 100_000, 4e-8
    logits = torch.full((1, vocab), math.log(tail))
    logits[0, 0] = math.log(1 - tail * (vocab - 1))
    alone = apply_top_k_top_p_min_p(logits.clone(), [_row()])
    batched = apply_top_k_top_p_min_p(logits.repeat(2, 1), [_row(), _row(top_p=0.5)])
    assert torch.equal(alone[0], logits[0])
    assert torch.equal(batched[0], logits[0]), int(batched[0].isinf().sum())
    top_k_all = apply_top_k_top_p_min_p(logits.clone(), [_row(top_k=vocab)])
    assert torch.equal(top_k_all[0], logits[0])


def test_seeds_2_to_the_32_apart_draw_different_tokens_on_the_cpu():
    """torch's CPU generator seeds from the low 32 bits: seed s and s + 2**32 (and -1 and
    2**32 - 1) drew identical tokens at every position. Each seed is still reproducible,
    alone or in a batch."""
    vocab = 1000
    logits = torch.zeros(1, vocab)  # uniform: the token is the draw
    sampler = Sampler(torch.device("cpu"), 0)

    def tokens(seed: int) -> list[int]:
        rows = [_row(seed, output_len=t) for t in range(16)]
        return sampler.sample(logits.expand(len(rows), vocab), rows)[0].tolist()

    for a, b in ((0, 2**32), (7, 7 + 2**32), (-1, 2**32 - 1), (3, 3 - 2**32)):
        assert tokens(a) != tokens(b), (a, b)
    assert tokens(2**40 + 5) == tokens(2**40 + 5)
    batch = [_row(), _row(2**40 + 5, output_len=3), _row(9)]
    batched = sampler.sample(logits.expand(3, vocab), batch)[0].tolist()
    assert batched[1] == tokens(2**40 + 5)[3]


def test_a_top_p_too_small_for_fp32_keeps_the_best_token():
    """top_p=1e-300 is valid (in (0, 1]) but is 0 in fp32: every token was cut, and the
    NaN row drew token 0 (here the least likely) instead of the most likely."""
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    sampler = Sampler(torch.device("cpu"), 0)
    for top_p in (1e-10, 1e-46, 1e-300):
        for kw in ({}, {"seed": 1}, {"min_p": 1.0}):
            assert sampler.sample(logits, [_row(top_p=top_p, **kw)])[0].tolist() == [1], top_p


def test_a_tiny_repetition_penalty_keeps_logits_finite_and_ordered():
    """repetition_penalty=1e-39 is valid (in (0, 10]) but dividing a logit by it overflows
    fp32: every seen positive token became +inf, so greedy took the first of them (not the
    best) and sampling drew from NaN probabilities."""
    logits = torch.tensor([[0.5, -1.0, 1.0, 0.25]])  # tokens 0 and 2 are in the prompt
    sampler = Sampler(torch.device("cpu"), 0)
    for penalty in (1e-39, 1e-50, 1e-300):
        for temperature in (0.0, 1e-5, 1.0):
            params = SamplingParams(temperature=temperature, repetition_penalty=penalty)
            row = SamplingRow(params, [0, 2], 2, None)
            ids, _ = sampler.sample(logits.clone(), [row])
            assert ids.tolist() == [2], (penalty, temperature)


def test_a_temperature_beyond_fp32_samples_uniformly_not_token_0():
    """temperature=1e39 is valid (finite as a Python float) but inf in fp32: a banned
    token's -inf (min_tokens holding EOS) divided by it is NaN, the row's probabilities all
    NaN, and every draw was token 0; a huge temperature is the uniform distribution over
    the tokens left, as at 1e38."""
    vocab, num = 50, 400
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(0))
    for temperature in (1e38, 1e39, 1e300):
        for seed in (None, 5):
            params = SamplingParams(temperature=temperature, min_tokens=3)
            params.all_stop_token_ids = {7}
            rows = [SamplingRow(params, [1, 1], 1, seed and seed + t) for t in range(num)]
            ids, _ = Sampler(torch.device("cpu"), 0).sample(logits.repeat(num, 1), rows)
            drawn = set(ids.tolist())
            assert 7 not in drawn and len(drawn) > vocab // 2, (temperature, seed, sorted(drawn))


def test_allowed_token_ids_leave_only_those_tokens_in_their_rows():
    """Every token outside a row's allowed_token_ids is -inf, for all rows at once; the
    other rows are untouched, and logprobs stay those of the raw distribution."""
    from vllm_runner.sample.sampler import apply_allowed_token_ids

    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(0))
    lists = [[3, 7], None, [29], [0, 5, 5, 11]]
    rows = [_row(allowed_token_ids=a) for a in lists]
    got = logits.clone()
    apply_allowed_token_ids(got, rows)
    for i, allowed in enumerate(lists):
        keep = set(range(30)) if allowed is None else set(allowed)
        for t in range(30):
            assert got[i, t] == (logits[i, t] if t in keep else -math.inf), (i, t)
    sampler = Sampler(torch.device("cpu"), 0)
    for temperature in (0.0, 1.0):
        params = SamplingParams(temperature=temperature, allowed_token_ids=[4, 9], logprobs=1)
        rows = [SamplingRow(params, [1], 1, seed) for seed in range(40)]
        out = sampler(logits[:1].repeat(40, 1), rows)
        assert set(out.token_ids) <= {4, 9}, temperature
        raw = logits[0].log_softmax(-1)
        pairs = zip(out.token_ids, out.logprobs, strict=True)
        assert all(abs(lp[0] - raw[t]) < 1e-5 for t, lp in pairs)


def test_huge_logits_at_a_low_temperature_draw_the_best_not_token_0():
    """fp32 logits past 3.4e36 at temperature 0.01 (the lowest above 0) overflowed to +inf
    when divided by it on the CPU: the row's probabilities were NaN and every draw was token
    0, here the least likely; the reference and the GPU kernel scale ``x - best`` and keep
    the best. Rows with ordinary logits are untouched by the fix."""
    sampler = Sampler(torch.device("cpu"), 0)
    rows_of_logits = [
        [-3e38, 0.0, 5e36, 1e37],
        [-3e38, 0.0, 1e38, 3e38],
        [-3e38, -2e37, -1.5e37, -1e37],
    ]
    for logits in torch.tensor(rows_of_logits)[:, None]:  # the best last, token 0 the worst
        for kw in ({}, {"top_p": 0.9}, {"top_k": 2}, {"min_p": 0.1}, {"seed": 3}):
            for temperature in (0.01, 0.5):
                rows = [_row(temperature=temperature, **kw)] * 20
                ids = sampler.sample(logits.repeat(20, 1), rows)[0].tolist()
                assert ids == [3] * 20, (logits, kw, temperature, ids)
