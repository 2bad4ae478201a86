"""The sampling kernel vs the fp64 reference on the same variates, and the reference's
draws against the distribution they sample."""

import math

import pytest
import torch

from kernels import reference, sampling
from kernels.sampling import _programs, kth_largest, race_uniforms, sample_rows, split_for

INF = math.inf
# (temperature, top_p, min_p, top_k): greedy, plain, each filter, all of them, a top_p
# among fp32's subnormals and one under its range (0 there; SamplingParams takes it): the
# best token alone
SETTINGS = [
    (0.0, 1.0, 0.0, 0),
    (1.0, 1.0, 0.0, 0),
    (0.7, 0.9, 0.0, 0),
    (1.3, 0.3, 0.0, 0),
    (1.0, 1.0, 0.0, 5),
    (0.8, 1.0, 0.2, 0),
    (0.9, 0.8, 0.05, 12),
    (1.0, 1e-40, 0.0, 0),
    (1.0, 1e-46, 0.0, 0),
]


def _params(settings, logits: torch.Tensor) -> torch.Tensor:
    """[rows, 4]: temperature, top_p, min_p, top_k."""
    assert len(settings) == logits.shape[0]
    return torch.tensor(settings, dtype=torch.float32, device=logits.device)


def _seeds(n: int, device: torch.device, start: int = 0) -> torch.Tensor:
    # keys over the whole int64 range, negative ones too
    return torch.tensor([(start + i) * 0x9E3779B97F4A7C15 % 2**64 - 2**63 for i in range(n)],
                        dtype=torch.int64, device=device)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("vocab", [300, 5000])
def test_kernel_draws_the_reference_token(device: torch.device, dtype, vocab: int) -> None:
    """Mixed rows of one batch, four keys each: the same token as the reference draws with
    the kernel's uniforms (bf16 logits have many ties, at the top-k and top-p cuts too)."""
    settings = SETTINGS * 4
    logits = (torch.randn(len(settings), vocab, device=device) * 3).to(dtype)
    logits[1, 7] = -INF  # a banned token
    params, seeds = _params(settings, logits), _seeds(len(settings), device)
    got = sample_rows(logits, params, seeds, block=256)
    want = reference.sample_rows(logits, params, race_uniforms(seeds, vocab))
    assert got.tolist() == want.tolist()
    assert got[0].item() == logits[0].float().argmax().item()
    for row in (7, 8):  # top_p 1e-40 and 1e-46 (0 in fp32): the best
        assert got[row].item() == logits[row].float().argmax().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_radix_select_finds_the_kth_largest(device: torch.device, dtype) -> None:
    """At every depth of a row that crosses zero, with ties and -inf: the k-th largest as
    a sort gives it."""
    vocab = 300
    ks = torch.tensor([*range(1, vocab, 7), 148, 149, 150, 151, vocab - 1], device=device)
    logits = torch.randn(len(ks), vocab, device=device).to(dtype)
    logits[:, :50] = logits[:, 50:100]
    logits[::3, 7] = -INF
    got = kth_largest(logits, ks, block=128)
    want = logits.float().sort(dim=-1, descending=True).values.gather(1, ks[:, None] - 1)[:, 0]
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_top_k_cut_at_every_depth_and_sign(device: torch.device, dtype) -> None:
    """The radix select's k-th largest at the top, the middle (where the signs meet) and
    the bottom of the row, in each dtype; a high temperature makes the race range over the
    whole kept set, so a wrong cut shows as another token."""
    vocab, ks = 400, [1, 2, 199, 200, 201, 399, 400]
    logits = torch.randn(len(ks) * 4, vocab, device=device).to(dtype)
    logits[:, :40] = logits[:, 40:80]  # ties everywhere
    settings = [(50.0, 1.0, 0.0, k) for k in ks] * 4
    params, seeds = _params(settings, logits), _seeds(len(settings), device, start=3)
    got = sample_rows(logits, params, seeds, block=128)
    want = reference.sample_rows(logits, params, race_uniforms(seeds, vocab))
    assert got.tolist() == want.tolist()
    assert len(set(got[2::7].tolist())) > 1  # (k = 199: the race does range)


def test_ties_at_the_cut_are_kept_whole_and_special_rows(device: torch.device) -> None:
    """A tie at the top-p cut is kept whole (the cut is by value); a row without a finite
    logit gives token 0, as argmax; a greedy row gives the first largest logit; a row with
    +inf logits (no distribution) its first, NaN logits are never drawn."""
    vocab, n = 6, 64
    logits = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0, -2.0]], device=device).repeat(n, 1)
    logits[-1] = -INF
    logits[-3] = torch.tensor([0.0, 1.0, INF, 2.0, INF, 0.0])
    logits[-4] = torch.tensor([math.nan, 1.0, math.nan, 1.0, 0.0, math.nan])
    logits[-2] = torch.tensor([0.0, 5.0, 2.0, 5.0, 1.0, 0.0])
    settings = [(1.0, 0.75, 0.0, 0)] * (n - 2) + [(0.0, 1.0, 0.0, 0), (1.0, 0.5, 0.0, 0)]
    params, seeds = _params(settings[:-1], logits[:-1]), _seeds(n - 1, device)
    params = torch.cat([params, torch.tensor([[1.0, 0.5, 0.0, 0.0]], device=device)])
    seeds = torch.cat([seeds, seeds[:1]])
    got = sample_rows(logits, params, seeds, block=4).tolist()
    # token 0 holds 0.68 of the mass; 0.75 keeps it and, by value, the three tied at 1.0
    assert set(got[: n - 4]) == {0, 1, 2, 3}, sorted(set(got[: n - 4]))
    assert got[-2] == 1 and got[-1] == 0 and got[-3] == 2 and got[-4] in (1, 3)
    ref = reference.sample_rows(logits, params, race_uniforms(seeds, vocab)).tolist()
    assert got[: n - 4] + got[-2:] == ref[: n - 4] + ref[-2:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nan_logits_under_top_k_are_never_ranked_or_drawn(device: torch.device, dtype) -> None:
    """A row with NaN logits (either sign) under top-k: the k largest of its other logits
    are kept. The radix select ranked a NaN above +inf (or below -inf), so the k-th largest
    came out NaN, nothing was kept and the row drew token ``vocab``, out of range."""
    row = torch.tensor([math.nan, 1.0, 2.0, 0.5, -math.nan, 3.0, 0.0, -INF], device=device)
    ranked = [5, 2, 1, 3, 6]  # the finite logits, largest first
    ks, n = [1, 2, 3, 5, 6, 7], 12
    logits = row.to(dtype).repeat(len(ks) * n, 1)
    settings = [(30.0, 1.0, 0.0, k) for k in ks for _ in range(n)]
    params, seeds = _params(settings, logits), _seeds(len(settings), device, start=7)
    got = sample_rows(logits, params, seeds, block=4).view(len(ks), n).tolist()
    for k, draws in zip(ks, got, strict=True):
        assert set(draws) <= set(ranked[:k]), (k, draws)
    assert len(set(got[2])) > 1  # (k = 3: the race does range)
    firsts = logits[[0, 2 * n, 3 * n]]  # k = 1, 3, 5
    ks = torch.tensor([1, 3, 5], device=device)
    assert kth_largest(firsts, ks, block=4).tolist() == [3.0, 1.0, 0.0]


def test_uniforms_stay_below_one_and_depend_on_the_key_alone(device: torch.device) -> None:
    """q = -log(u) = 0 would be a win for any token: no uniform reaches 1. A key's
    variates are the same in any batch."""
    seeds = _seeds(6, device)
    u = race_uniforms(seeds, 4000)
    assert u.max().item() < 1.0 and u.min().item() >= 0.0
    assert torch.equal(race_uniforms(seeds[3:4], 4000)[0], u[3])
    assert not torch.equal(u[0], u[1])


def test_reference_draws_follow_the_filtered_distribution() -> None:
    """The reference's race, on torch's uniforms, samples softmax(logits / t) restricted to
    min-p, then top-k, then top-p (renormalised): frequencies over 40,000 draws."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0, -8.0], dtype=torch.float64)
    t, top_p, min_p, k = 0.9, 0.85, 0.01, 6
    probs = (logits / t).softmax(-1)
    keep = (probs >= min_p * probs.max()) & (logits >= logits.topk(k).values[-1])
    probs = torch.where(keep, probs, 0.0) / probs[keep].sum()
    before = probs.cumsum(-1) - probs  # (sorted already, no ties)
    probs = torch.where(before < top_p, probs, 0.0)
    probs /= probs.sum()
    n = 40_000
    params = torch.tensor([[t, top_p, min_p, k]]).repeat(n, 1)
    gen = torch.Generator().manual_seed(0)
    draws = reference.sample_rows(logits.repeat(n, 1), params, torch.rand(n, 8, generator=gen))
    freq = torch.bincount(draws, minlength=8).double() / n
    sigma = (probs * (1 - probs) / n).sqrt()
    assert ((freq - probs).abs() <= 5 * sigma + 1e-12).all(), (freq, probs)
    assert freq[probs == 0].sum() == 0


def test_a_keyed_row_draws_the_same_token_in_any_batch(device: torch.device) -> None:
    """A row's draw depends on its logits, settings and key alone: alone, or among others
    in another place of the batch, the same token."""
    settings = SETTINGS[1:7]
    logits = torch.randn(len(settings), 700, device=device) * 2
    params, seeds = _params(settings, logits), _seeds(len(settings), device, start=11)
    batch = sample_rows(logits, params, seeds, block=128).tolist()
    order = list(reversed(range(len(settings))))
    flipped = sample_rows(logits[order], params[order], seeds[order], block=128).tolist()
    assert flipped == batch[::-1]
    for i in (0, 3):
        alone = sample_rows(logits[i : i + 1], params[i : i + 1], seeds[i : i + 1], block=128)
        assert alone.item() == batch[i]


def test_top_p_and_min_p_cut_exactly_where_vllm_does(device: torch.device) -> None:
    """At a temperature near fp32's largest, four distinct logits hold exactly 1/4 each
    (p / p_max is 1 in fp32 and fp64). A token is kept while the mass strictly above it is
    under top_p (vLLM: an ascending cumulative mass <= 1 - top_p is cut): top_p 0.5 keeps
    the best two, 0.75 three, 0.76 all; min_p keeps p = min_p x p_max (min_p 1: the tied
    best). The kernel and the reference alike."""
    n, ranked = 32, [1, 3, 2, 0]
    row = torch.tensor([0.0, 3.0, 1.0, 2.0], device=device)
    tied = torch.tensor([0.0, 3.0, 1.0, 3.0], device=device)
    cases = [(row, (3e38, 0.5, 0.0, 0), ranked[:2]), (row, (3e38, 0.75, 0.0, 0), ranked[:3]),
             (row, (3e38, 0.76, 0.0, 0), ranked), (tied, (1.0, 1.0, 1.0, 0), [1, 3])]  # fmt: skip
    for x, settings, kept in cases:
        logits = x.repeat(n, 1)
        params, seeds = _params([settings] * n, logits), _seeds(n, device, start=41)
        got = sample_rows(logits, params, seeds, block=4).tolist()
        want = reference.sample_rows(logits, params, race_uniforms(seeds, 4)).tolist()
        assert sorted(set(got)) == sorted(kept) and got == want, (settings, got, want)


def test_top_k_on_fp16_logits_that_differ_only_in_low_bits(device: torch.device) -> None:
    """fp16 has 10 mantissa bits: its radix select needs all 4 passes (bf16's 2 cover the
    fp32 key's top 16 bits, 7 mantissa bits), or the k-th largest is rounded down and the
    tokens just below it (here 2**-10 apart) are kept too."""
    n = 48
    row = torch.tensor([1.0, 1 + 2**-10, 1 + 2**-9, 1 + 3 * 2**-10, 0.5, -1.0], device=device)
    logits = row.half().repeat(n, 1)
    for k, kept in ((1, [3]), (2, [2, 3]), (3, [1, 2, 3])):
        params, seeds = _params([(50.0, 1.0, 0.0, k)] * n, logits), _seeds(n, device, start=53)
        got = sample_rows(logits, params, seeds, block=4).tolist()
        want = reference.sample_rows(logits, params, race_uniforms(seeds, 6)).tolist()
        assert sorted(set(got)) == kept and got == want, (k, got)


@pytest.mark.gpu
def test_kernel_at_llama3_vocabulary_and_its_frequencies(device: torch.device) -> None:
    """bf16 logits of Llama 3's vocabulary, the kernel's default tiles: the reference's
    tokens; and 200,000 keys on one small row: the filtered distribution's frequencies."""
    settings = SETTINGS * 8
    logits = (torch.randn(len(settings), 128256, device=device) * 4).bfloat16()
    params, seeds = _params(settings, logits), _seeds(len(settings), device, start=5)
    want = reference.sample_rows(logits, params, race_uniforms(seeds, 128256))
    assert sample_rows(logits, params, seeds).tolist() == want.tolist()

    n, row = 200_000, torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0, -8.0], device=device)
    t, top_p = 0.9, 0.85
    probs = (row.double() / t).softmax(-1)
    probs = torch.where(probs.cumsum(-1) - probs < top_p, probs, 0.0)
    probs /= probs.sum()
    params = torch.tensor([[t, top_p, 0.0, 0.0]], device=device).repeat(n, 1)
    draws = sample_rows(row.repeat(n, 1), params, _seeds(n, device, start=1000))
    freq = torch.bincount(draws, minlength=8).double() / n
    sigma = (probs * (1 - probs) / n).sqrt()
    assert ((freq - probs).abs() <= 5 * sigma + 1e-12).all(), (freq, probs)


def test_split_for_keeps_every_program_of_a_row_resident() -> None:
    """Programs per row: a power of two up to 32, rows x split within the programs allowed
    at once, a tile or more each; one on a full batch or in the interpreter."""
    assert [split_for(r, 128256, 2048, 66) for r in (1, 2, 3, 4, 8, 16, 33, 34, 256)] == [
        32, 32, 16, 16, 8, 4, 2, 1, 1,
    ]  # fmt: skip
    assert split_for(1, 5000, 1024, 66) == 4  # (4 parts of 1250 tokens: 2 tiles each)
    assert split_for(1, 1024, 1024, 66) == split_for(1, 128256, 2048, 1) == 1
    assert split_for(1, 4096, 1024, 66) == 4  # (a tile each, exactly)
    assert split_for(1, 1 << 20, 1024, 1000) == 32  # (MAX_SPLIT)


def test_sample_split_allows_half_the_sms(monkeypatch) -> None:
    """Programs resident at once: half a CUDA device's SMs (one program an SM at most)."""
    import types

    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: types.SimpleNamespace(multi_processor_count=132))  # fmt: skip
    sampling._programs.cache_clear()
    try:
        assert sampling._programs(torch.device("cuda", 0)) == 66
    finally:
        sampling._programs.cache_clear()


@pytest.mark.parametrize("split", [0, -2])
def test_a_forced_split_below_one_is_refused(device: torch.device, split: int) -> None:
    """A caller's split under 1: a clear error, not a division by zero or an empty grid
    (split -2 launched no program and returned an uninitialised token)."""
    logits, params = torch.zeros(1, 64, device=device), torch.zeros(1, 4, device=device)
    with pytest.raises(AssertionError, match=f"split {split} "):
        sample_rows(logits, params, torch.zeros(1, dtype=torch.int64, device=device), block=16,
                    split=split)  # fmt: skip


def test_sample_split_switch_keeps_one_program_a_row(monkeypatch) -> None:
    """VLLM_RUNNER_SAMPLE_SPLIT=0: no row is split, on any device (no card is asked)."""
    monkeypatch.setenv("VLLM_RUNNER_SAMPLE_SPLIT", "0")
    sampling._programs.cache_clear()
    try:
        assert sampling._programs(torch.device("cuda", 0)) == 1
    finally:
        sampling._programs.cache_clear()


def test_start_up_and_step_launches_share_one_compile(monkeypatch) -> None:
    """The Sampler's start-up launch (fresh [1, 4] params, [1] seeds) and a step's (both
    views of one staged [rows, 3] int64 tensor, as ``Sampler._race_on_device`` passes them:
    params 8 bytes in, row strides 6 and 3) bind to the same sm_90 specialization, so the
    start-up compile is the one the steps run."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction, create_function_from_signature

    kernel = sampling._sample_kernel
    if isinstance(kernel, InterpretedFunction):  # (the interpreter's wrapper: same settings)
        kernel = JITFunction(kernel.fn, **kernel.kwargs)
    bind = create_function_from_signature(kernel.signature, kernel.params,
                                          CUDABackend(GPUTarget("cuda", 90, 32)))  # fmt: skip
    launches = []
    recorder = type("Recorder", (), {"__getitem__": lambda self, grid: lambda *a, **k: (
        launches.append(bind(*a, **k)[1]))})  # fmt: skip
    monkeypatch.setattr(sampling, "_sample_kernel", recorder())
    vocab, settings = 128256, [1.0, 0.5, 0.0, 2.0]
    sample_rows(torch.zeros(1, vocab, dtype=torch.bfloat16), torch.tensor([settings]),
                torch.zeros(1, dtype=torch.int64))  # fmt: skip
    for rows in (1, 3):
        staged = torch.zeros(rows, 3, dtype=torch.int64)
        staged[:, 1:].view(torch.float32)[:] = torch.tensor(settings)
        sample_rows(torch.zeros(rows, vocab, dtype=torch.bfloat16),
                    staged[:, 1:].view(torch.float32), staged[:, 0])  # fmt: skip
    assert launches[1] == launches[0] and launches[2] == launches[0], launches


def _split_draws(logits, params, seeds, split: int, block: int = 2048) -> list[int]:
    """sample_rows with ``split`` programs a row, over as many rows a launch as fit at once."""
    step = max(_programs(logits.device) // split, 1)
    rows = [slice(i, i + step) for i in range(0, logits.shape[0], step)]
    return [t for r in rows for t in sample_rows(logits[r], params[r], seeds[r], block=block,
                                                 split=split).tolist()]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_split_rows_draw_the_reference_token(device: torch.device, dtype) -> None:
    """A row split over 2-32 programs (ragged and empty last parts; the largest logit, the
    top-k histograms, the race and each top-p round exchanged between them): the same
    token as the reference, at Llama 3's vocabulary and GPT-2's; auto splits for 1-3 rows."""
    settings = SETTINGS * 3
    for vocab in (128256, 50257):
        logits = (torch.randn(len(settings), vocab, device=device) * 4).to(dtype)
        logits[1, 7], logits[4, 3000:9000] = -INF, -INF  # (banned across parts)
        params, seeds = _params(settings, logits), _seeds(len(settings), device, start=17)
        want = reference.sample_rows(logits, params, race_uniforms(seeds, vocab)).tolist()
        for split in (2, 4, 8, 32):
            assert _split_draws(logits, params, seeds, split) == want, (vocab, split)
        for n in (1, 2, 3):
            assert sample_rows(logits[:n], params[:n], seeds[:n]).tolist() == want[:n]


@pytest.mark.gpu
def test_split_rows_special_rows_and_empty_parts(device: torch.device) -> None:
    """Ties at the top-p cut, +inf, NaN, -inf and greedy rows (the interpreter test's) split
    in parts of 4 tokens, the last two parts past the vocabulary: the unsplit tokens."""
    n = 64
    logits = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0, -2.0]], device=device).repeat(n, 1)
    logits[-1] = -INF
    logits[-3] = torch.tensor([0.0, 1.0, INF, 2.0, INF, 0.0])
    logits[-4] = torch.tensor([math.nan, 1.0, math.nan, 1.0, 0.0, math.nan])
    settings = [(1.0, 0.75, 0.0, k) for k in (0, 2, 3, 5)] * (n // 4 - 1) + [
        (1.0, 0.5, 0.0, 2), (1.0, 0.5, 0.0, 0), (0.0, 1.0, 0.0, 0), (1.0, 0.5, 0.0, 0),
    ]  # fmt: skip
    params, seeds = _params(settings, logits), _seeds(n, device, start=29)
    want = sample_rows(logits, params, seeds, block=4, split=1).tolist()
    assert _split_draws(logits, params, seeds, split=4, block=4) == want
    assert want[-1] == 0 and want[-3] == 2 and want[-4] in (1, 3)


@pytest.mark.gpu
def test_no_compile_in_the_first_sampled_steps(device: torch.device) -> None:
    """The Sampler's start-up launch compiles the kernel its steps run: none compiles in
    the first sampled steps, split or not, on the model's bf16 logits or edited fp32 ones
    (a vocabulary no other test uses, so nothing compiled it before)."""
    from vllm_runner.sample.rows import SamplingRow
    from vllm_runner.sample.sampler import Sampler
    from vllm_runner.sampling_params import SamplingParams

    vocab = 100_003
    sampler = Sampler(device, 0, vocab, torch.bfloat16)
    compiled = sampling._sample_kernel.device_caches[torch.cuda.current_device()][0]
    count = len(compiled)
    for n in (1, 3, 40):
        logits = torch.randn(n, vocab, device=device).bfloat16()
        for params in (SamplingParams(temperature=0.8, top_p=0.9, top_k=40),
                       SamplingParams(temperature=0.8, logit_bias={5: 1.0})):  # fmt: skip
            sampler.sample(logits, [SamplingRow(params, [1], 1, None)] * n)
    torch.cuda.synchronize()
    assert len(compiled) == count >= 2
