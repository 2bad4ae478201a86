"""Greedy tokens through cache and budget pressure on the tiny llama: prompts sharing a
prefix cut on and off block boundaries (hits that cover a whole prompt), n > 1, a cache so
small that requests preempt each other, step budgets of one token, less than a block and a
little more, max_num_seqs of one. Each completion must get the tokens its request gets alone
on an engine with room to spare and no prefix cache."""

import random

import pytest
from engine_testing import make_llm

from vllm_runner import SamplingParams

BLOCK = 16


def pressure_batch() -> tuple[list[list[int]], list[SamplingParams]]:
    rng = random.Random(4)
    base = [rng.randrange(384) for _ in range(3 * BLOCK)]
    batch, params = [], []
    for _ in range(8):
        cut = rng.choice([BLOCK, 2 * BLOCK, 2 * BLOCK + 1, 3 * BLOCK - 1, 3 * BLOCK])
        batch.append(base[:cut] + [rng.randrange(384) for _ in range(rng.choice([0, 0, 1, 5]))])
        params.append(SamplingParams(max_tokens=rng.randint(1, 30), temperature=0.0,
                                     ignore_eos=True, n=rng.choice([1, 1, 2])))  # fmt: skip
    return batch, params


@pytest.fixture(scope="module")
def alone(llama_dir) -> list[list[list[int]]]:
    roomy = make_llm(llama_dir, enable_prefix_caching=False)
    return [
        [c.token_ids for c in roomy.generate([prompt], sp)[0].outputs]
        for prompt, sp in zip(*pressure_batch(), strict=True)
    ]


@pytest.mark.parametrize(
    "kw",
    [
        dict(max_num_batched_tokens=1, max_num_seqs=2),
        dict(max_num_batched_tokens=7),
        dict(max_num_batched_tokens=17, max_num_seqs=1),
        dict(max_num_batched_tokens=17, async_scheduling=True),
        dict(max_num_batched_tokens=64, async_scheduling=True),
    ],
)
def test_greedy_tokens_under_pressure_match_each_request_alone(llama_dir, alone, kw):
    small = make_llm(llama_dir, num_kv_blocks=6, **kw)  # 96 tokens: long requests preempt
    outs = small.generate(*pressure_batch())
    assert [[c.token_ids for c in out.outputs] for out in outs] == alone
    assert all(c.finish_reason == "length" for out in outs for c in out.outputs)
    stats = small.stats()
    assert stats["kv_blocks_used"] == stats["num_running"] == stats["num_waiting"] == 0
    assert stats["prefix_cache_hits"] > 0
    # (a step budget of one token runs one request at a time: its decode takes it all)
    if kw["max_num_batched_tokens"] > 1 and kw.get("max_num_seqs") != 1:
        assert stats["num_preemptions"] > 0
