"""SamplingParams read as vLLM reads them: seed=-1, a temperature under 0.01, logprobs=True,
and the order of each token's logprobs (each found in review)."""

import torch

from vllm_runner import LLM, SamplingParams
from vllm_runner.sample.sampler import Sampler, SamplingRow


def test_seed_minus_1_means_no_seed(tiny_model_dirs):
    """vLLM (and OpenAI's API) read seed=-1 as "no seed": a random draw each request. It was
    the fixed seed -1, so every request sent with it drew the same tokens."""
    assert SamplingParams(seed=-1).seed is None
    assert SamplingParams(seed=-2).seed == -2 and SamplingParams(seed=0).seed == 0
    llm = LLM(tiny_model_dirs["llama"], dtype="float32", device="cpu", cpu_kv_cache_gb=0.05)
    params = SamplingParams(seed=-1, max_tokens=8, ignore_eos=True)
    runs = {tuple(llm.generate([[5, 17, 42, 99]], params)[0].token_ids) for _ in range(3)}
    assert len(runs) > 1


def test_a_temperature_under_0_01_samples_at_0_01_as_vllm():
    """vLLM raises a temperature in (0, 0.01) to 0.01 and samples there: only 0 is greedy.
    1e-6 was greedy here (under 1e-5), 1e-3 sampled at 1e-3."""
    for t in (1e-6, 1e-5, 1e-3, 0.0099):
        params = SamplingParams(temperature=t)
        assert params.temperature == 0.01 and not params.greedy, t
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(temperature=0.02).temperature == 0.02
    # logits 0.02 apart: at 0.01, token 0 has probability 1 / (1 + e^2) ~ 0.12
    logits = torch.tensor([[0.0, 0.02]]).repeat(200, 1)
    rows = [SamplingRow(SamplingParams(temperature=1e-6), [1], 1, seed) for seed in range(200)]
    ids, _ = Sampler(torch.device("cpu"), 0).sample(logits, rows)
    assert 10 < ids.tolist().count(0) < 50


def test_logprobs_true_means_1_as_vllm():
    assert SamplingParams(logprobs=True).logprobs == 1
    assert SamplingParams(prompt_logprobs=True).prompt_logprobs == 1


def test_the_sampled_tokens_logprob_comes_first_then_the_top_n_by_rank():
    """vLLM lists the sampled token first, then the ``logprobs`` most likely by rank (the
    sampled one once, where it is among them); it came last, after the top n."""
    raw = torch.tensor([[3.0, 1.0, 2.0, 0.0, -1.0]])
    ref = raw.log_softmax(-1)[0].tolist()
    sampler = Sampler(torch.device("cpu"), 0)
    for bias, sampled, order in (({}, 0, [0, 2, 1]),
                                 ({2: 2.0}, 2, [2, 0, 1]),
                                 ({4: 9.0}, 4, [4, 0, 2, 1])):  # fmt: skip
        params = SamplingParams(temperature=0.0, logprobs=3, logit_bias=bias)
        out = sampler(raw.clone(), [SamplingRow(params, [1], 1, None)])
        assert out.token_ids == [sampled]
        chosen, top = out.logprobs[0]
        assert list(top) == order, bias
        assert chosen == top[sampled] and all(abs(top[t] - ref[t]) < 1e-6 for t in top)
