"""The runner's step assembly seen through the engine and on its own: overlapped steps'
penalties count each request's token still on the device once, and only it; a step mixing
a prompt-logprobs request with others reads every row; the block table's width rounds up;
an overlapped engine's last, empty steps still release finished requests."""

from types import SimpleNamespace

import torch
from engine_testing import make_llm, prompts

from vllm_runner import SamplingParams
from vllm_runner.worker.model_runner import ModelRunner


def _runner(
    prev: list[int], prev_rows: dict[str, int], num_pending: dict[str, int]
) -> SimpleNamespace:
    """What ``ModelRunner._pending_tokens`` reads of a runner."""
    states = {r: SimpleNamespace(num_pending=n) for r, n in num_pending.items()}
    return SimpleNamespace(
        _prev=(torch.tensor(prev), prev_rows),
        batch=SimpleNamespace(states=states),
        device=torch.device("cpu"),
    )


def test_pending_tokens_are_the_rows_still_on_the_device():
    """Per sampling row, its token from the last overlapped launch while still pending,
    else -1: "b", sampling for the first time beside "a" and "c" that have one, gets -1 and
    they keep theirs; rows whose tokens of that launch are on the host since (synchronous
    steps ran between: the kept ids are stale for them) give None."""
    runner = _runner([11, 22, 33], {"a": 0, "x": 1, "c": 2}, {"a": 1, "b": 0, "c": 1})
    got = ModelRunner._pending_tokens(runner, ["b", "a", "c"])
    assert got.tolist() == [-1, 11, 33]
    stale = _runner([11, 22], {"a": 0, "b": 1}, {"a": 0, "b": 0})
    assert ModelRunner._pending_tokens(stale, ["a", "b"]) is None


def test_logprobs_rows_beside_penalised_rows_match_sync(llama_dir):
    """A row asking only for logprobs (extras, no penalty) in the batch of penalised rows:
    overlapped steps still count the penalised rows' tokens on the device."""
    batch = prompts(10, seed=8)
    kinds = [dict(repetition_penalty=1.6), dict(frequency_penalty=1.5),
             dict(presence_penalty=1.8, repetition_penalty=0.7), dict(logprobs=0),
             dict(temperature=1.0, seed=3, frequency_penalty=0.9)]  # fmt: skip
    params = [SamplingParams(**{"max_tokens": 14, "temperature": 0.0, "ignore_eos": True,
                                **kinds[i % len(kinds)]}) for i in range(len(batch))]  # fmt: skip
    want = make_llm(llama_dir, async_scheduling=False).generate(batch, params)
    got = make_llm(llama_dir, async_scheduling=True).generate(batch, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]


def test_one_request_of_a_step_asks_for_prompt_logprobs(llama_dir):
    """A step where one request asks for prompt logprobs and one does not: that step reads
    every token's hidden state (no pruning to the sampled rows), and the asking request gets
    the list it gets alone."""
    plain, asking = prompts(2, seed=6)
    greedy = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    scored = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, prompt_logprobs=1)
    want = make_llm(llama_dir).generate([asking], scored)[0]
    got = make_llm(llama_dir).generate([plain, asking], [greedy, scored])
    assert got[0].prompt_logprobs is None and got[1].token_ids == want.token_ids
    assert len(got[1].prompt_logprobs) == len(asking)
    for x, y in zip(got[1].prompt_logprobs[1:], want.prompt_logprobs[1:], strict=True):
        assert list(x) == list(y) and all(abs(x[t] - y[t]) < 1e-5 for t in x)


def test_a_max_model_len_short_of_a_whole_block_still_reaches_it(llama_dir):
    """max_model_len 40 with blocks of 16: a request that reaches it holds 3 blocks, the
    last one partly filled (the block table's width is rounded up, not down)."""
    llm = make_llm(llama_dir, max_model_len=40)
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    out = llm.generate([list(range(1, 31))], params)[0].outputs[0]
    assert len(out.token_ids) == 10 and out.finish_reason == "length"


def test_overlapped_steps_leave_no_finished_request_state(llama_dir):
    """With steps overlapped, the last steps schedule nothing (every request's in-flight
    token ends it) while they carry the ids of requests finished since: the runner still
    forgets those requests' states and block-table rows."""
    llm = make_llm(llama_dir, async_scheduling=True)
    params = [
        SamplingParams(max_tokens=3 + i, temperature=0.0, ignore_eos=True, logprobs=i % 2 or None)
        for i in range(4)
    ]
    llm.generate(prompts(4, seed=5), params)
    batch = llm.engine.runner.batch
    assert batch.states == {} and not batch.block_table.any() and not batch.needs_rows
