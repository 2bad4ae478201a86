"""SamplingParams read as vLLM reads them: seed=-1, a temperature under 0.01, logprobs=True,
and the order of each token's logprobs (each found in review)."""

import sys

import numpy as np
import pytest
import torch

from vllm_runner import LLM, SamplingParams
from vllm_runner.sample.rows import SamplingRow
from vllm_runner.sample.sampler import Sampler


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


def test_defaults_are_vllms():
    p = SamplingParams()
    assert (p.n, p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 16, 1.0, 1.0, 0, 0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.seed, p.logprobs, p.prompt_logprobs, p.min_tokens) == (None, None, None, 0)
    assert p.skip_special_tokens and p.detokenize
    assert not p.ignore_eos and not p.include_stop_str_in_output
    assert (p.stop, p.stop_token_ids, p.logit_bias, p.allowed_token_ids) == ([], [], None, None)
    assert not p.greedy and not p.has_penalties


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"temperature": True}, "temperature must be a number, got True"),
        ({"presence_penalty": 2.5}, r"presence_penalty must be in \[-2, 2\], got 2.5"),
        ({"frequency_penalty": -3}, r"frequency_penalty must be in \[-2, 2\], got -3"),
        ({"repetition_penalty": 0}, r"repetition_penalty must be in \(0, 10\], got 0"),
        ({"repetition_penalty": 10.5}, r"repetition_penalty must be in \(0, 10\], got 10.5"),
        ({"min_p": 1.5}, r"min_p must be in \[0, 1\], got 1.5"),
        ({"min_tokens": -1}, "min_tokens must be an integer >= 0, got -1"),
        ({"min_tokens": 5, "max_tokens": 4}, r"min_tokens must be <= max_tokens \(4\), got 5"),
        ({"logprobs": 21}, r"logprobs must be an integer in \[0, 20\], got 21"),
        ({"prompt_logprobs": -1}, r"prompt_logprobs must be an integer in \[0, 20\], got -1"),
        ({"logprobs": 1.0}, r"logprobs must be an integer in \[0, 20\], got 1.0"),  # not True
        ({"seed": 1.5}, "seed must be an integer, got 1.5"),
        ({"stop": [""]}, r"stop must be non-empty strings, got \[''\]"),
        ({"stop": ["x"], "detokenize": False}, r"stop \['x'\] needs detokenize=True, got False"),
        ({"stop_token_ids": [-1]}, r"stop_token_ids entry must be a token id \(an integer >= 0\), "
                                   "got -1"),
        ({"allowed_token_ids": "12"}, "allowed_token_ids must be a non-empty list of token ids, "
                                      "got '12'"),  # (not its characters)
        ({"allowed_token_ids": {1: 2}}, "allowed_token_ids must be a non-empty list of token "
                                        r"ids, got \{1: 2\}"),  # (not its keys)
        ({"logit_bias": [(1, 2.0)]}, r"logit_bias must be a \{token id: bias\} dict, got \[\(1, "),
        ({"logit_bias": {True: 1.0}}, r"logit_bias key must be a token id \(an integer >= 0\), "
                                      "got True"),
        ({"logit_bias": {-1: 1.0}}, r"logit_bias key must be a token id .*, got -1"),
        ({"logit_bias": {3: "1"}}, r"logit_bias\[3\] must be in \[-100, 100\], got '1'"),
        ({"logit_bias": {3: -100.5}}, r"logit_bias\[3\] must be in \[-100, 100\], got -100.5"),
        ({"logit_bias": {3: 100.5}}, r"logit_bias\[3\] must be in \[-100, 100\], got 100.5"),
    ],
)  # fmt: skip
def test_bad_values_name_the_value_and_the_limit(kw, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        SamplingParams(**kw)


@pytest.mark.parametrize(
    "kw",
    [{"temperature": sys.float_info.max}, {"top_k": 2**63 - 1}, {"min_p": 1.0},
     {"presence_penalty": -2.0}, {"presence_penalty": 2.0}, {"frequency_penalty": -2.0},
     {"frequency_penalty": 2.0}, {"repetition_penalty": 10.0}, {"repetition_penalty": 0.01},
     {"min_tokens": 4, "max_tokens": 4}, {"min_tokens": 4, "max_tokens": None},
     {"logprobs": 20}, {"prompt_logprobs": 20}, {"logprobs": 0},
     {"logit_bias": {0: -100.0, 5: 100}}],
)  # fmt: skip
def test_values_at_the_limits_are_taken(kw):
    params = SamplingParams(**kw)
    assert all(getattr(params, name) == value for name, value in kw.items())


def test_values_read_as_vllm_reads_them():
    assert SamplingParams(stop="ab").stop == ["ab"]  # one stop string, not "a" and "b"
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(temperature=0.01).temperature == 0.01
    params = SamplingParams(truncate_prompt_tokens=np.int64(4), stop_token_ids=[np.int32(7)],
                            allowed_token_ids=(np.int64(2), 3))  # fmt: skip
    assert type(params.truncate_prompt_tokens) is int and params.truncate_prompt_tokens == 4
    assert [type(t) for t in params.stop_token_ids + params.allowed_token_ids] == [int] * 3
    assert params.allowed_token_ids == [2, 3]


def test_greedy_and_penalties():
    assert SamplingParams(temperature=0.0).greedy and SamplingParams(top_k=1).greedy
    assert not SamplingParams(top_k=2).greedy
    for name, value in (("presence_penalty", 0.5), ("frequency_penalty", -0.5),
                        ("repetition_penalty", 1.2)):  # fmt: skip
        assert SamplingParams(**{name: value}).has_penalties, name


def test_numpy_numbers_in_logit_bias_are_taken_as_elsewhere():
    """A bias of numpy's float32 was refused as "must be in [-100, 100], got
    np.float32(1.0)", a numpy integer key as "must be a token id (an integer >= 0)"."""
    params = SamplingParams(logit_bias={np.int64(3): np.float32(1.5), 4: np.float64(-2.0)})
    assert params.logit_bias == {3: 1.5, 4: -2.0}
    assert [type(t) for t in params.logit_bias] == [int, int]
    with pytest.raises(ValueError, match=r"logit_bias\[3\] must be in \[-100, 100\], got "):
        SamplingParams(logit_bias={np.int64(3): np.float32(101)})
