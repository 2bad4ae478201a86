"""Piecewise graphs' pieces on CPU (no capture: the same padded pieces run eagerly, as they
do under ``enforce_eager`` on a GPU): steps that prefill give the engine's tokens."""

import pytest
from engine_testing import GREEDY, make_llm, prompts

from vllm_runner import SamplingParams
from vllm_runner.worker.piecewise_graphs import PiecewiseGraphs, piecewise_buckets


@pytest.fixture
def piece_runs(monkeypatch) -> list[tuple[int, int]]:
    """(bucket, tokens) of every step that ran in pieces."""
    runs = []
    run = PiecewiseGraphs.run

    def counted(self, size, num_tokens, positions):
        runs.append((size, num_tokens))
        return run(self, size, num_tokens, positions)

    monkeypatch.setattr(PiecewiseGraphs, "run", counted)
    return runs


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_steps_in_pieces_give_the_engines_tokens(tiny_model_dirs, family, piece_runs):
    """Chunked prompts beside decoding requests (mixed steps of 2-96 tokens, padded to 64 or
    128): the same greedy tokens as the plain forward, and no KV block left behind."""
    path = tiny_model_dirs[family]
    batch = prompts(16, seed=7)
    plain = make_llm(path, max_num_batched_tokens=96).generate(batch, GREEDY)
    pieces = make_llm(path, max_num_batched_tokens=96, piecewise_max_tokens=128)
    assert [o.token_ids for o in pieces.generate(batch, GREEDY)] == [o.token_ids for o in plain]
    assert piece_runs and {size for size, _ in piece_runs} <= {64, 96}
    assert all(n <= size for size, n in piece_runs) and any(n < size for size, n in piece_runs)
    assert pieces.stats()["kv_blocks_used"] == 0


def test_steps_that_pieces_do_not_take(tiny_model_dirs, piece_runs):
    """Prompt logprobs read every token's hidden state: those steps run the plain forward
    (same values as without pieces); decode steps never run in pieces; OPT has no pieces."""
    path = tiny_model_dirs["llama"]
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, prompt_logprobs=2)
    batch = prompts(2, seed=8)
    want = make_llm(path).generate(batch, params)
    got = make_llm(path, piecewise_max_tokens=256).generate(batch, params)
    assert [o.prompt_logprobs for o in got] == [o.prompt_logprobs for o in want]
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert piece_runs == []  # the prefill had prompt logprobs; the rest were decode steps
    opt = make_llm(tiny_model_dirs["opt"], piecewise_max_tokens=256)
    assert opt.engine.runner.pieces is None
    assert opt.generate(batch, GREEDY)[0].token_ids


def test_buckets():
    assert piecewise_buckets(96) == [64, 96]
    assert piecewise_buckets(1024) == list(range(64, 1025, 64))
    buckets = piecewise_buckets(3000)
    assert buckets[16:24] == list(range(1152, 2049, 128))
    assert buckets[24:] == [2304, 2560, 2816, 3000]
