"""A request's ``seed`` fixes its tokens and logprobs whatever else the engine does: chunked
prefill, preemption (sync and async), prefix-cache hits, row order, n > 1, AsyncLLM; an
engine's ``seed`` fixes a whole run of unseeded requests across fresh engines. (Reviewed, no
bug found: these pin the property beside test_sampling.py's batch and test_engine.py's
async / penalty cases.)"""

import asyncio

import pytest
from engine_testing import make_llm, prompts

from vllm_runner import AsyncLLM, SamplingParams

PROMPT = [5, 17, 42, 99, 3, 250, 7] * 6  # 42 tokens: 2 full blocks, then a partial one
KINDS = [
    dict(temperature=1.2),
    dict(temperature=1.0, presence_penalty=0.5, frequency_penalty=0.7, repetition_penalty=1.3),
    dict(temperature=1.5, top_k=50, top_p=0.9, min_p=0.02),
]


def seeded(i: int, **kw) -> SamplingParams:
    """KINDS[i] with seed 1000 + i (unless ``kw`` sets one), 20 tokens, logprobs."""
    kw = {"seed": 1000 + i, "max_tokens": 20, "logprobs": 2, "ignore_eos": True, **kw}
    return SamplingParams(**KINDS[i], **kw)


def unseeded(**kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 30, "temperature": 1.0, "ignore_eos": True, **kw})


def assert_same(got, want) -> None:
    """The same tokens; the same logprobs where ``got`` has them."""
    for a, b in zip(got.outputs, want.outputs, strict=True):
        assert a.token_ids == b.token_ids
        if a.logprobs is None:
            continue
        assert a.cumulative_logprob == pytest.approx(b.cumulative_logprob, abs=1e-4)
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert x.keys() == y.keys()
            assert list(x.values()) == pytest.approx(list(y.values()), abs=1e-4)


@pytest.fixture(scope="module")
def alone(llama_dir):
    """Each seeded kind's output on PROMPT, alone on a fresh default engine."""
    return [make_llm(llama_dir).generate([PROMPT], seeded(i))[0] for i in range(len(KINDS))]


@pytest.mark.parametrize(
    "engine",
    [  # prompts in chunks between others' decodes; preempted, recomputed (from the cache)
        dict(max_num_batched_tokens=8, num_kv_blocks=10, enable_prefix_caching=False),
        dict(max_num_batched_tokens=16, num_kv_blocks=9, async_scheduling=True),
    ],
)
def test_seeded_outputs_survive_chunking_and_preemption(llama_dir, alone, engine):
    """Seeded requests last in the batch (the newest, preempted first), unseeded ones ahead;
    with async scheduling, steps overlap (logprobs are copied with the sampled ids)."""
    overlap = engine.get("async_scheduling", False)
    others = prompts(6, seed=31)
    llm = make_llm(llama_dir, **engine)
    launches = []
    launch = llm.engine.runner.launch
    llm.engine.runner.launch = lambda sched, o: launches.append(o) or launch(sched, o)
    params = [unseeded()] * len(others) + [seeded(i) for i in range(len(KINDS))]
    outs = llm.generate(others + [PROMPT] * len(KINDS), params)
    for i, want in enumerate(alone):
        assert_same(outs[len(others) + i], want)
    assert all(launches) if overlap else not any(launches)
    assert llm.stats()["num_preemptions"] > 0 and llm.stats()["kv_blocks_used"] == 0


def test_seeded_outputs_survive_prefix_hits_and_row_order(llama_dir, alone):
    llm = make_llm(llama_dir)
    llm.generate([PROMPT[:40] + [1, 2]], SamplingParams(max_tokens=1))  # caches 2 blocks
    others = prompts(3, seed=32)
    params = [seeded(i) for i in reversed(range(len(KINDS)))] + [unseeded(seed=7)] * 3
    outs = llm.generate([PROMPT] * len(KINDS) + others, params)
    for i, want in enumerate(reversed(alone)):
        assert outs[i].num_cached_tokens == 32
        assert_same(outs[i], want)
    again = llm.generate([PROMPT], [seeded(0, prompt_logprobs=1)])[0]  # (no cache, no pruning)
    assert_same(again, alone[0])


def test_n_siblings_each_draw_their_own_seeded_stream(llama_dir):
    """As vLLM, sibling i of seed s draws as n = 1 with seed s + i: the siblings differ, and
    each repeats under another engine setup."""
    params = seeded(1, n=3)
    base = make_llm(llama_dir).generate([PROMPT], params)[0]
    assert len({tuple(c.token_ids) for c in base.outputs}) == 3
    other = make_llm(llama_dir, async_scheduling=True, max_num_batched_tokens=16)
    mixed = other.generate(prompts(2, seed=33) + [PROMPT], [unseeded()] * 2 + [params])[2]
    assert_same(mixed, base)
    for i, completion in enumerate(base.outputs):
        one = make_llm(llama_dir).generate([PROMPT], seeded(1, seed=1001 + i))[0]
        assert one.outputs[0].token_ids == completion.token_ids


def test_an_engine_seed_repeats_a_whole_unseeded_run(llama_dir):
    """Two fresh engines of one seed give the same unseeded samples (n = 2, mixed lengths);
    another engine seed gives others; a request's own seed ignores the engine's."""
    batch = prompts(6, seed=34)
    params = [unseeded(n=2, max_tokens=4 + i, presence_penalty=0.3 * (i % 2)) for i in range(6)]

    def run(**kw):
        return [
            [c.token_ids for c in o.outputs]
            for o in make_llm(llama_dir, **kw).generate(batch, params)
        ]

    for kw in ({}, {"async_scheduling": True, "max_num_batched_tokens": 16}):
        assert run(seed=5, **kw) == run(seed=5, **kw)
    assert run(seed=5) != run(seed=6)
    mine = [make_llm(llama_dir, seed=s).generate([PROMPT], seeded(2))[0] for s in (5, 6)]
    assert_same(mine[0], mine[1])


def test_async_llm_in_a_thread_samples_as_llm(llama_dir, alone):
    """Seeded requests among concurrent others, and an unseeded one alone (same engine
    seed), as LLM.generate gives them."""
    want_unseeded = make_llm(llama_dir).generate([PROMPT], unseeded())[0]

    async def main():
        llm = AsyncLLM(
            model_name=llama_dir, dtype="float32", device="cpu", cpu_kv_cache_gb=0.05,
            engine_process=False,
        )  # fmt: skip
        try:
            first = (await llm.generate([PROMPT], unseeded()))[0]
            calls = [llm.generate([p], unseeded()) for p in prompts(3, seed=35)]
            calls += [llm.generate([PROMPT], seeded(i)) for i in range(len(KINDS))]
            return first, [r[0] for r in await asyncio.gather(*calls)][3:]
        finally:
            await llm.shutdown()

    first, got = asyncio.run(main())
    assert first.token_ids == want_unseeded.token_ids
    for a, b in zip(got, alone, strict=True):
        assert_same(a, b)
