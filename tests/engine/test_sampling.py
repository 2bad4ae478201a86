"""Sampling: seeded reproducibility, top-k = 1, penalties vs HF, and a chi-square check that
sampled frequencies follow the softmax distribution."""

import math
import random
from collections import Counter

import pytest
import torch

import vllm_runner.sample.sampler as sampler_module
from vllm_runner import LLM, SamplingParams
from vllm_runner.sample.rows import SamplingRow
from vllm_runner.sample.sampler import Sampler, inverse_cdf_sample


@pytest.fixture(scope="module")
def llama(tiny_model_dirs):
    return LLM(tiny_model_dirs["llama"], dtype="float32", device="cpu", cpu_kv_cache_gb=0.05)


@pytest.fixture(scope="module")
def hf_llama(tiny_model_dirs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        tiny_model_dirs["llama"], dtype=torch.float32
    ).eval()


PROMPT = [5, 17, 42, 99, 3, 250, 7]


def test_seeded_request_is_reproducible_whatever_the_batch(llama):
    seeded = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    alone = llama.generate([PROMPT], seeded)[0].token_ids
    rng = random.Random(0)
    others = [[rng.randrange(384) for _ in range(rng.randint(3, 40))] for _ in range(7)]
    mixed = llama.generate(
        others[:3] + [PROMPT] + others[3:],
        [SamplingParams(max_tokens=10, temperature=1.0)] * 3
        + [seeded]
        + [SamplingParams(max_tokens=20, temperature=0.5)] * 4,
    )
    assert mixed[3].token_ids == alone
    other_seed = SamplingParams(
        max_tokens=16, temperature=0.9, top_p=0.95, seed=99, ignore_eos=True
    )
    assert llama.generate([PROMPT], other_seed)[0].token_ids != alone


def test_top_k_1_equals_greedy(llama):
    greedy = llama.generate(
        [PROMPT], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    )[0].token_ids
    top1 = llama.generate(
        [PROMPT], SamplingParams(max_tokens=16, temperature=1.3, top_k=1, ignore_eos=True)
    )[0].token_ids
    assert top1 == greedy


def test_repetition_penalty_matches_hf(llama, hf_llama):
    params = SamplingParams(max_tokens=20, temperature=0.0, repetition_penalty=1.5, ignore_eos=True)
    ours = llama.generate([PROMPT], params)[0].token_ids
    with torch.no_grad():
        hf = hf_llama.generate(
            torch.tensor([PROMPT]),
            max_new_tokens=20,
            do_sample=False,
            repetition_penalty=1.5,
            eos_token_id=-1,
            pad_token_id=0,
        )
    assert ours == hf[0, len(PROMPT) :].tolist()


def test_presence_and_frequency_penalties_reduce_repeats(llama):
    base = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    plain = llama.generate([PROMPT], base)[0].token_ids
    penalized = llama.generate(
        [PROMPT],
        SamplingParams(
            max_tokens=40,
            temperature=0.0,
            ignore_eos=True,
            presence_penalty=2.0,
            frequency_penalty=2.0,
        ),
    )[0].token_ids
    assert max(Counter(penalized).values()) <= max(Counter(plain).values())
    assert len(set(penalized)) >= len(set(plain))


def chi_square_critical(dof: int, z: float = 3.09) -> float:
    """Upper critical value at p ~= 0.001 (Wilson-Hilferty approximation)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def first_token_distribution(hf_model, temperature: float, top_k: int = 0) -> torch.Tensor:
    with torch.no_grad():
        logits = hf_model(torch.tensor([PROMPT])).logits[0, -1].double() / temperature
    if top_k:
        kth = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits.softmax(-1)


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.7, 5)])
def test_sampled_frequencies_follow_softmax(llama, hf_llama, temperature, top_k):
    num = 3000
    probs = first_token_distribution(hf_llama, temperature, top_k)
    outs = llama.generate(
        [PROMPT] * num,
        SamplingParams(max_tokens=1, temperature=temperature, top_k=top_k, ignore_eos=True),
    )
    counts = Counter(o.token_ids[0] for o in outs)
    assert set(counts) <= set(torch.nonzero(probs).flatten().tolist())
    # Bins with expected count >= 5; the rest pooled into one bin.
    expected = probs * num
    big = (expected >= 5).nonzero().flatten().tolist()
    observed = [counts.get(t, 0) for t in big] + [num - sum(counts.get(t, 0) for t in big)]
    exp = [float(expected[t]) for t in big] + [num - float(expected[big].sum())]
    pairs = [(o, e) for o, e in zip(observed, exp, strict=True) if e > 0]
    stat = sum((o - e) ** 2 / e for o, e in pairs)
    assert stat < chi_square_critical(len(pairs) - 1), (stat, len(pairs))


def test_inverse_cdf_sampling_follows_each_rows_distribution():
    """The CPU sampler (one uniform per row against the cumulative probabilities): each row
    of a batch is drawn from its own distribution, never a token of probability zero (at
    either end, between others), and a seeded row draws alike alone or in a batch."""

    def row(seed=None):
        return SamplingRow(SamplingParams(temperature=1.0), [1, 2], 1, seed)

    probs = torch.tensor(
        [
            [0.0, 0.5, 0.0, 0.25, 0.25, 0.0],
            [0.7, 0.0, 0.0, 0.0, 0.0, 0.3],
            [0.0, 0.0, 0.0, 0.0, 0.0, 1.0],
        ]
    )
    num, g = 20000, torch.Generator().manual_seed(0)
    counts = torch.zeros_like(probs)
    for _ in range(num // 100):
        ids = inverse_cdf_sample(probs.repeat(100, 1), [row()] * 300, g).view(100, 3)
        for r in range(3):
            counts[r] += torch.bincount(ids[:, r], minlength=6)
    assert (counts[probs == 0] == 0).all()
    for r in range(3):
        support = probs[r] > 0
        expected, observed = probs[r][support] * num, counts[r][support]
        if len(expected) > 1:
            stat = float(((observed - expected) ** 2 / expected).sum())
            assert stat < chi_square_critical(len(expected) - 1), (r, stat)
    spread = torch.full((1, 1000), 1e-3)
    seeded = [row(seed=s) for s in range(20)]
    alone = [int(inverse_cdf_sample(spread, [r], g)[0]) for r in seeded]
    batched = [
        int(inverse_cdf_sample(spread.repeat(3, 1), [row(), r, row()], g)[1]) for r in seeded
    ]
    assert batched == alone and len(set(alone)) > 10


def _row(seed=None, **kw):
    return SamplingRow(SamplingParams(**{"temperature": 1.0, **kw}), [1, 2], 1, seed)


def test_inverse_cdf_sample_leaves_float64_probs_alone():
    """(found in review: probs.double() is probs itself when already float64, and the
    cumulative sum overwrote the caller's probabilities)"""
    probs = torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64)
    before = probs.clone()
    inverse_cdf_sample(probs, [_row()], torch.Generator().manual_seed(0))
    assert torch.equal(probs, before)


def test_a_nan_row_gives_token_0_as_greedy_and_the_exponential_race():
    """A row with no finite logit (all -inf, or a NaN) has NaN probabilities: argmax (greedy,
    the GPU race) gives token 0, and so does the CPU's inverse CDF (found in review: the
    last token)."""
    vocab = 64
    logits = torch.randn(3, vocab)
    logits[0] = float("-inf")
    logits[1, 5] = float("nan")
    rows = [_row(), _row(seed=3), _row(temperature=0.0)]
    sampled, _ = Sampler(torch.device("cpu"), 0).sample(logits, rows)
    assert sampled.tolist()[:2] == [0, 0], sampled.tolist()  # was [63, 63]
    assert sampled.tolist()[2] == int(logits[2].argmax())


def test_no_zero_probability_token_at_any_cdf_boundary(monkeypatch):
    """u at 0, 1 - 2**-53 and on / next to every cumulative boundary, for sparse rows of
    wide dynamic range: the token drawn always has probability > 0."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(200):
        vocab = int(torch.randint(2, 200, (1,), generator=gen))
        logits = torch.randn(vocab, generator=gen) * float(torch.rand(1, generator=gen) * 60)
        logits[torch.rand(vocab, generator=gen) < float(torch.rand(1, generator=gen))] = -math.inf
        logits[int(torch.randint(0, vocab, (1,), generator=gen))] = 0.0
        probs = logits.softmax(-1)
        cdf = probs.double().cumsum(-1)
        us = [0.0, 2.0**-53, 1 - 2.0**-53]
        for c in (cdf / cdf[-1]).tolist():
            us += [x for x in (c, math.nextafter(c, 0), math.nextafter(c, 1)) if 0 <= x < 1]
        u = torch.tensor(us, dtype=torch.float64)
        monkeypatch.setattr(sampler_module.torch, "rand", lambda *a, u=u, **k: u.clone())
        ids = inverse_cdf_sample(
            probs.expand(len(us), vocab).contiguous(), [_row()] * len(us), None
        )
        monkeypatch.undo()
        assert (probs[ids] > 0).all()


@pytest.mark.parametrize("rows", [1, 16, 17])
def test_greedy_is_argmax_with_ties(rows):
    """The greedy path (a few rows on a GPU: kernels.argmax, else torch): argmax's ids,
    ties (first max), a max at the last entry, -inf rows and NaN (the first NaN)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vocab = 1000
    g = torch.Generator().manual_seed(rows)
    logits = torch.randn(rows, vocab, generator=g)
    logits[0, [7, vocab // 2, vocab - 1]] = 9.0
    logits[-1] = -math.inf
    if rows > 2:
        logits[1, [vocab // 3, vocab - 1]] = math.nan
    sampler = Sampler(device, seed=0)
    for dtype in (torch.float32, torch.bfloat16):
        x = logits.to(device=device, dtype=dtype)
        assert torch.equal(sampler.greedy(x), x.argmax(dim=-1))


def test_min_p_before_top_p_and_min_tokens_hold_eos():
    """vLLM V1's order: min_p on the whole distribution, then top-k / top-p on what is left
    (top-p renormalises); min_tokens bans EOS even under ignore_eos."""
    from vllm_runner.sample.sampler import apply_min_tokens, apply_top_k_top_p_min_p

    logits = torch.tensor([[0.5, 0.3, 0.1, 0.1]]).log()
    row = SamplingRow(SamplingParams(min_p=0.25, top_p=0.6), [1], 1, None)
    probs = apply_top_k_top_p_min_p(logits.clone(), [row]).softmax(-1)
    # min_p keeps 0.5 / 0.3 (0.625 / 0.375 renormalised); top_p 0.6 then keeps the first
    assert probs.tolist() == [[1.0, 0.0, 0.0, 0.0]]

    params = SamplingParams(min_tokens=3, ignore_eos=True, temperature=0.0)
    params.all_stop_token_ids = {0}
    held = torch.tensor([[5.0, 1.0, 0.0, 0.0]])
    apply_min_tokens(held, [SamplingRow(params, [1], 1, None)])
    assert held.argmax().item() == 1


@pytest.mark.parametrize("chunk", [None, 8])
def test_prompt_logprobs_match_hf_with_top_k(tiny_model_dirs, hf_llama, monkeypatch, chunk):
    """vLLM's prompt_logprobs: per position after the first, {token: logprob} holding the
    prompt token's own logprob given its prefix and the top-k tokens', as HF's full forward
    gives them; whether the prompt is prefilled in one step or in chunks of ``chunk``
    tokens, and with the logits taken a few rows at a time."""
    from vllm_runner.worker import prompt_logprobs

    monkeypatch.setattr(prompt_logprobs, "PROMPT_LOGPROB_ROWS", 4)
    kw = {"max_num_batched_tokens": chunk} if chunk else {}
    llm = LLM(tiny_model_dirs["llama"], dtype="float32", device="cpu", cpu_kv_cache_gb=0.05,
              **kw)  # fmt: skip
    prompt = [5, 17, 42, 99, 3, 250, 7, 7, 31, 64, 128, 9, 200, 11, 1, 77, 300, 2, 45]
    out = llm.generate([prompt], SamplingParams(max_tokens=2, prompt_logprobs=3))[0]
    with torch.no_grad():
        ref = hf_llama(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(prompt)
    for pos, top in enumerate(out.prompt_logprobs[1:], start=1):
        want_top = ref[pos - 1].topk(3)
        want = {prompt[pos]: ref[pos - 1, prompt[pos]].item()}
        want.update(zip(want_top.indices.tolist(), want_top.values.tolist(), strict=True))
        assert top.keys() == want.keys(), pos
        for token, lp in want.items():
            assert top[token] == pytest.approx(lp, abs=1e-4), (pos, token)


def test_prompt_logprobs_zero_gives_the_prompt_tokens_own(llama):
    prompt = [5, 17, 42, 99, 3]
    out = llama.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    assert [None if d is None else list(d) for d in out.prompt_logprobs] == [
        None,
        *([t] for t in prompt[1:]),
    ]


def test_logit_bias_shifts_the_logits_before_penalties(llama, hf_llama):
    """logit_bias adds to the raw logits (vLLM V1: before penalties): a +100 on a token
    makes greedy pick it, a -100 on the greedy token moves greedy to the runner-up; out of
    range or unknown tokens are errors naming the value."""
    with torch.no_grad():
        logits = hf_llama(torch.tensor([PROMPT])).logits[0, -1]
    best, second = logits.topk(2).indices.tolist()
    worst = int(logits.argmin())

    def first(bias: dict[int, float]) -> int:
        params = SamplingParams(max_tokens=1, temperature=0.0, logit_bias=bias)
        return llama.generate([PROMPT], params)[0].token_ids[0]

    assert first({}) == best
    assert first({best: -100.0}) == second
    assert first({worst: 100.0}) == worst
    with pytest.raises(ValueError, match=r"logit_bias\[3\] must be in \[-100, 100\], got 101"):
        SamplingParams(logit_bias={3: 101})
    with pytest.raises(ValueError, match="logit_bias token id 100000 is outside the vocabulary"):
        first({100000: 1.0})


def test_penalties_of_a_mixed_batch_match_each_row_alone():
    """All rows at once: each row gets exactly its own penalties (repetition over prompt and
    output, frequency by count, presence once), rows without penalties are untouched."""
    from vllm_runner.sample.sampler import apply_penalties

    vocab, rng = 50, random.Random(3)
    settings = [dict(repetition_penalty=1.5), dict(frequency_penalty=0.7),
                dict(presence_penalty=-0.4, repetition_penalty=0.8), {},
                dict(frequency_penalty=-1.2, presence_penalty=1.1)]  # fmt: skip
    rows = []
    for s in settings:
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(1, 12))]
        output = [rng.randrange(vocab) for _ in range(rng.randint(0, 30))]
        rows.append(SamplingRow(SamplingParams(**s), prompt + output, len(prompt), None))
    logits = torch.randn(len(rows), vocab, generator=torch.Generator().manual_seed(0))
    got = logits.clone()
    apply_penalties(got, rows)
    for i, row in enumerate(rows):
        p, want = row.params, logits[i].double().clone()
        counts = Counter(row.output_token_ids)
        for t in range(vocab):
            if p.repetition_penalty != 1.0 and (t in counts or t in row.prompt_token_ids):
                r = p.repetition_penalty
                want[t] = want[t] / r if want[t] > 0 else want[t] * r
            want[t] -= p.frequency_penalty * counts[t] + p.presence_penalty * (counts[t] > 0)
        torch.testing.assert_close(got[i].double(), want, rtol=0, atol=1e-5)


@pytest.mark.gpu
def test_sampling_on_a_gpu_never_waits_for_the_device():
    """A step's sampling (async scheduling launches it before the previous step's results
    are read) queues its per-row values from pinned memory: a copy from pageable memory
    waits for the whole forward before it. Every sampling feature at once, under CUDA's
    sync debug mode, which raises on any synchronizing call; the same tokens as on the CPU
    for the rows whose choice does not depend on the random stream."""

    if not torch.cuda.is_available():
        pytest.fail("the gpu suite needs a CUDA device")
    vocab = 1000
    settings = [
        dict(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, seed=3),
        dict(temperature=1.0, logit_bias={7: 100.0}),  # (the bias decides)
        dict(temperature=0.0, min_tokens=4, repetition_penalty=1.3, presence_penalty=0.5),
        dict(temperature=0.7, frequency_penalty=0.4, top_k=1),  # (top-1 decides)
        dict(temperature=0.0, allowed_token_ids=[3, 8, 500]),
        dict(temperature=1.0, allowed_token_ids=[3, 8, 500], seed=7),
    ]
    rows = []
    for s in settings:
        params = SamplingParams(**s)
        params.all_stop_token_ids = {0}
        rows.append(SamplingRow(params, [5, 9, 11, 12], 2, s.get("seed")))
    logits = torch.randn(len(rows), vocab, generator=torch.Generator().manual_seed(0))
    logits[:, 0] = 50.0  # EOS would win where min_tokens does not hold it
    cuda_logits = logits.cuda()
    pending = torch.tensor([-1, 3, 4, -1, -1, -1], device="cuda")
    sampler = Sampler(torch.device("cuda"), 0)
    # rows that leave the logits as they are: the kernel reads the model's bf16 logits
    plain = [dict(temperature=0.8, top_p=0.9, seed=3), dict(temperature=1.0, top_k=20),
             dict(temperature=0.0), dict(temperature=0.5, min_p=0.1, logprobs=2)]  # fmt: skip
    plain = [SamplingRow(SamplingParams(**s), [5, 9], 1, s.get("seed")) for s in plain]
    bf16 = logits[:4].cuda().bfloat16()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sampled, _ = sampler.sample(cuda_logits, rows, pending)
        fast, fast_logprobs = sampler.sample(bf16, plain)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want, _ = Sampler(torch.device("cpu"), 0).sample(logits, rows, pending.cpu())
    got = sampled.tolist()
    assert got[1:5] == want.tolist()[1:5] and got[1] == 7 and got[2] != 0
    assert got[4] in (3, 8, 500) and got[5] in (3, 8, 500)
    assert fast[2].item() == bf16[2].float().argmax().item() and fast_logprobs.shape == (4, vocab)
    assert fast[1].item() in bf16[1].float().topk(20).indices.tolist()
    for _ in range(3):  # a seeded row alone: its token in the batch (through both buffers)
        assert sampler.sample(bf16[:1], plain[:1])[0].item() == fast[0].item()
