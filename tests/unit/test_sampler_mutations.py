"""The sampler's exact semantics on tiny CPU tensors, each pinning behaviour a hand-made
mutation of the sampling path changed with no other test failing (expected values by hand
or in float64 torch, never from the code under test)."""

import math

import torch

from vllm_runner.sample.rows import SamplingRow
from vllm_runner.sample.sampler import (
    Sampler,
    apply_min_tokens,
    apply_penalties,
    apply_top_k_top_p_min_p,
)
from vllm_runner.sampling_params import SamplingParams

CPU = torch.device("cpu")


def _row(prompt=(1,), output=(), seed=None, num_pending=0, **kw) -> SamplingRow:
    tokens = [*prompt, *output]
    return SamplingRow(SamplingParams(**kw), tokens, len(prompt), seed, num_pending)


def test_logprobs_0_gives_the_sampled_tokens_logprob_alone():
    """vLLM: logprobs=0 returns the sampled token's logprob (and no top tokens), not None;
    the only row of the batch asking for it, with nothing else to edit its logits."""
    logits = torch.tensor([[0.5, 2.0, -1.0, 1.0], [0.0, 0.0, 3.0, 0.0]])
    want = logits.double().log_softmax(-1)
    rows = [_row(temperature=0.0, logprobs=0), _row(temperature=0.0)]
    out = Sampler(CPU, 0)(logits.clone(), rows)
    assert out.token_ids == [1, 2]
    chosen, top = out.logprobs[0]
    assert list(top) == [1] and math.isclose(chosen, want[0, 1], abs_tol=1e-6)
    assert top[1] == chosen and out.logprobs[1] is None


def test_logprobs_list_the_sampled_token_first_then_the_top_n():
    """vLLM: {sampled token: its logprob, then the top n by rank}, of the raw distribution:
    a logit bias makes token 2 (raw rank 2) the greedy pick, and it leads the dict."""
    logits = torch.tensor([[0.5, 2.0, 1.5, -1.0]])
    want = logits.double().log_softmax(-1)[0]
    row = _row(temperature=0.0, logprobs=2, logit_bias={2: 1.0})
    out = Sampler(CPU, 0)(logits.clone(), [row])
    chosen, top = out.logprobs[0]
    assert out.token_ids == [2] and list(top) == [2, 1]
    assert math.isclose(chosen, want[2], abs_tol=1e-6) and top[2] == chosen
    assert math.isclose(top[1], want[1], abs_tol=1e-6)


def test_logit_bias_goes_to_its_own_row_of_the_batch():
    """Each row's logit_bias edits that row's logits only: row 1's +5 on token 3 makes
    token 3 its greedy pick, while rows 0 and 2 keep their argmax."""
    logits = torch.tensor([[4.0, 0.0, 1.0, 0.0], [4.0, 0.0, 1.0, 0.0], [0.0, 0.0, 3.0, 0.0]])
    rows = [_row(temperature=0.0), _row(temperature=0.0, logit_bias={3: 5.0}),
            _row(temperature=0.0, logit_bias={0: 1.0})]  # fmt: skip
    ids, _ = Sampler(CPU, 0).sample(logits.clone(), rows)
    assert ids.tolist() == [0, 3, 2]


def test_a_pending_token_0_counts_as_output_for_penalties():
    """Async scheduling: a row's token still on the device (here token id 0) counts as an
    output token for frequency / presence / repetition, as those on the host; -1 is none."""
    logits = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    rows = [_row(output=[2], frequency_penalty=0.5, presence_penalty=0.25),
            _row(output=[2], repetition_penalty=2.0),
            _row(output=[2], frequency_penalty=0.5)]  # fmt: skip
    got = logits.clone()
    apply_penalties(got, rows, pending=torch.tensor([0, 0, -1]))
    want = torch.tensor([[1.0 - 0.75, 2.0, 3.0 - 0.75],
                         [1.0 / 2, 2.0, 3.0 / 2],  # (prompt token 1 seen too)
                         [1.0, 2.0, 3.0 - 0.5]])  # fmt: skip
    want[1, 1] = 2.0 / 2
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_min_tokens_holds_eos_for_exactly_min_tokens_outputs():
    """min_tokens=2: EOS and stop_token_ids are banned while fewer than 2 tokens are out
    (counting one still on the device), and allowed from the 3rd token on."""
    params = dict(min_tokens=2, stop_token_ids=[2], temperature=0.0)
    eos = 3
    for output, pending, banned in (((), 0, True), ((5,), 0, True), ((5,), 1, False),
                                    ((5, 6), 0, False), ((5, 6, 7), 0, False)):  # fmt: skip
        row = _row(output=output, num_pending=pending, **params)
        row.params.all_stop_token_ids = {eos}
        logits = torch.zeros(1, 6)
        apply_min_tokens(logits, [row])
        want = [-math.inf if banned and t in (2, eos) else 0.0 for t in range(6)]
        assert logits[0].tolist() == want, (output, pending)


def test_a_seeded_request_draws_fresh_randomness_at_each_position():
    """A seed fixes a stream of draws, not one draw: over a uniform 1000-token distribution
    the 16 positions of one seed give (almost) 16 different tokens, on the CPU (the uniform)
    and for the GPU's Philox key alike."""
    from vllm_runner.sample.sampler import race_key

    vocab = 1000
    rows = [_row(output=[7] * t, seed=42) for t in range(16)]
    drawn = Sampler(CPU, 0).sample(torch.zeros(16, vocab), rows)[0].tolist()
    assert len(set(drawn)) >= 12, drawn
    assert len({race_key(r) for r in rows}) == 16
    # one token still on the device is a position too (async scheduling)
    pending = _row(output=[7] * 4, seed=42, num_pending=1)
    assert race_key(pending) == race_key(rows[5])
    assert Sampler(CPU, 1).sample(torch.zeros(1, vocab), [pending])[0].tolist() == [drawn[5]]


def test_top_p_cuts_a_token_whose_better_mass_is_exactly_top_p():
    """As vLLM and HF (ascending cumulative mass <= 1 - top_p is cut): a token is kept when
    the mass strictly above it is under top_p. Probabilities 1/2, 1/4, 1/8, 1/8 (exact in
    fp32): top_p 0.5 keeps the first alone, 0.7 and 0.75 the first two, 0.8 and 0.875 all
    (the tie whole)."""
    x = torch.tensor([[3.0, 2.0, 1.0, 1.0]]) * math.log(2) - 5.0
    for top_p, kept in ((0.5, 1), (0.75, 2), (0.875, 4), (0.7, 2), (0.8, 4)):
        out = apply_top_k_top_p_min_p(x.clone(), [_row(top_p=top_p)])
        assert out.isfinite().tolist() == [[t < kept for t in range(4)]], top_p


def test_logit_bias_is_added_before_the_repetition_penalty():
    """vLLM V1's order: bias, then penalties. Token 0 (seen, logit 2, bias +2) under
    repetition_penalty 2 is (2 + 2) / 2 = 2, below token 1's 2.5 (bias after the penalty:
    2 / 2 + 2 = 3, and token 0 won)."""
    logits = torch.tensor([[2.0, 2.5, -1.0]])
    row = _row(prompt=[0], temperature=0.0, repetition_penalty=2.0, logit_bias={0: 2.0})
    assert Sampler(CPU, 0).sample(logits.clone(), [row])[0].tolist() == [1]
    row = _row(prompt=[0], temperature=0.0, repetition_penalty=2.0, logit_bias={0: 3.2})
    assert Sampler(CPU, 0).sample(logits.clone(), [row])[0].tolist() == [0]  # (2 + 3.2) / 2 = 2.6


def test_prompt_logprobs_list_the_prompt_token_first_then_the_top_k():
    """vLLM's prompt_logprobs: None for the first token, then per position {prompt token:
    its logprob given the prefix, then the top-k by rank}, the prompt token first (as the
    sampled token in ``logprobs``), and its rank (how many tokens are at least as likely);
    here the prompt in two chunks, and an identity head."""
    from types import SimpleNamespace

    import numpy as np

    from vllm_runner.worker.prompt_logprobs import prompt_logprobs

    prompt = [3, 0, 2, 2, 1]
    logits = torch.tensor([[0.0, 1.0, 2.0, 0.5], [3.0, 0.0, 1.0, 2.0], [0.0, 0.0, 1.0, 4.0],
                           [1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 9.0]])  # fmt: skip
    model = SimpleNamespace(compute_logits=lambda hidden: hidden)
    state = SimpleNamespace(params=SamplingParams(prompt_logprobs=2), num_prompt_tokens=5,
                            token_ids=list(prompt), prompt_logprobs=[],
                            prompt_ranks=[])  # fmt: skip
    result = SimpleNamespace(prompt_logprobs={}, prompt_ranks={})
    for lo, hi in ((0, 3), (3, 5)):  # a chunk: positions lo .. hi - 1
        sampling_ids = ["r"] if hi == len(prompt) else []  # (the prompt's last chunk samples)
        inputs = SimpleNamespace(request_ids=["r"], query_start_loc=np.array([0, hi - lo]),
                                 seq_lens=np.array([hi]), sampling_ids=sampling_ids)  # fmt: skip
        prompt_logprobs(model, {"r": state}, inputs, logits[lo:hi], result)
    want = logits.double().log_softmax(-1)
    # position p predicts prompt[p + 1]; the top 2 of each row by hand
    tops = [[2, 1], [0, 3], [3, 2], [1, 0]]
    got = result.prompt_logprobs["r"]
    assert got[0] is None and len(got) == len(prompt)
    for p, entry in enumerate(got[1:]):
        order = [prompt[p + 1]] + [t for t in tops[p] if t != prompt[p + 1]]
        assert list(entry) == order, (p, entry)
        for t in order:
            assert math.isclose(entry[t], want[p, t], abs_tol=1e-6), (p, t)
    # prompt[1:] = 0, 2, 2, 1: 4, 3, 2 and 1 tokens of their rows are at least as likely
    assert result.prompt_ranks["r"] == [None, 4, 3, 2, 1]


def test_top_p_and_min_p_filter_the_tempered_distribution():
    """vLLM applies temperature first, then min_p / top-k / top-p. Logits 2, 1, 0 at
    temperature 2: p = softmax(1, 0.5, 0) = 0.506, 0.307, 0.186, so top_p 0.6 keeps tokens
    0 and 1 (at temperature 1, 0.665 of the mass is above token 1: token 0 alone); min_p 0.5
    keeps token 1 (p / p_max = e**-0.5 = 0.61; at temperature 1, e**-1 = 0.37)."""
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    tempered = (logits.double() / 2).softmax(-1)[0]
    assert tempered[0] < 0.6 < tempered[0] + tempered[1]  # (the cut, in fp64)
    assert tempered[1] / tempered[0] > 0.5 > tempered[2] / tempered[0]
    sampler = Sampler(CPU, 0)
    for kw in ({"top_p": 0.6}, {"min_p": 0.5}):
        rows = [_row(temperature=2.0, seed=s, **kw) for s in range(64)]
        drawn = sampler.sample(logits.repeat(64, 1), rows)[0].tolist()
        assert set(drawn) == {0, 1}, (kw, drawn)
