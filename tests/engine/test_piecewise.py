"""Piecewise graphs' pieces on CPU (no capture: the same padded pieces run eagerly, as they
do under ``enforce_eager`` on a GPU): steps that prefill give the engine's tokens."""

import random

import pytest
from engine_testing import GREEDY, make_llm, prompts

from vllm_runner import SamplingParams
from vllm_runner.worker.model_runner import ModelRunner
from vllm_runner.worker.piecewise_graphs import piecewise_buckets


@pytest.fixture
def piece_runs(monkeypatch) -> list[dict]:
    """Every step that ran in pieces: its bucket, tokens, requests, decode rows and how many
    input ids were still on the device (async scheduling patches them in the padded ids)."""
    runs = []
    piece_size = ModelRunner._piece_size

    def spy(self, inputs):
        size = piece_size(self, inputs)
        if size is not None:
            runs.append(
                dict(
                    size=size,
                    tokens=len(inputs.input_ids),
                    missing=len(inputs.missing),
                    reqs=len(inputs.request_ids),
                    decode=inputs.num_decode_rows,
                )
            )
        return size

    monkeypatch.setattr(ModelRunner, "_piece_size", spy)
    return runs


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_steps_in_pieces_give_the_engines_tokens(
    tiny_model_dirs, family, async_scheduling, piece_runs
):
    """Chunked prompts beside decoding requests (mixed steps of up to 96 tokens, padded to
    64 or 96): the same greedy tokens as the plain forward, also when the step's input ids
    come from the previous step on the device; decode steps never run in pieces; no KV
    block left behind."""
    path = tiny_model_dirs[family]
    batch = prompts(16, seed=7)
    kw = dict(max_num_batched_tokens=96, async_scheduling=async_scheduling)
    plain = make_llm(path, **kw).generate(batch, GREEDY)
    pieces = make_llm(path, piecewise_max_tokens=128, **kw)
    assert [o.token_ids for o in pieces.generate(batch, GREEDY)] == [o.token_ids for o in plain]
    assert piece_runs and {r["size"] for r in piece_runs} <= {64, 96}
    assert all(r["decode"] < r["reqs"] for r in piece_runs)
    assert any(r["tokens"] < r["size"] for r in piece_runs)
    assert any(r["missing"] for r in piece_runs) == async_scheduling
    assert pieces.stats()["kv_blocks_used"] == 0


@pytest.mark.parametrize("setting", [{"quantization": "int8"}, {"kv_cache_dtype": "fp8"}])
def test_quantized_steps_in_pieces_give_the_engines_tokens(tiny_model_dirs, piece_runs, setting):
    """int8 weights or an fp8 KV cache (a served engine on CUDA takes pieces by default,
    whatever its settings; fp8 weights need a GPU: tests/model/test_gpu.py): the pieces'
    tokens equal the plain forward's."""
    path = tiny_model_dirs["llama"]
    batch = prompts(8, seed=9)
    kw = dict(max_num_batched_tokens=96, **setting)
    plain = make_llm(path, **kw).generate(batch, GREEDY)
    pieces = make_llm(path, piecewise_max_tokens=128, **kw)
    assert [o.token_ids for o in pieces.generate(batch, GREEDY)] == [o.token_ids for o in plain]
    assert piece_runs


def test_prefix_cache_hits_in_pieces(tiny_model_dirs, piece_runs):
    """Prompts that share a 48-token prefix with an earlier one: their steps attend to cached
    blocks they did not compute (from the paged cache, eagerly between pieces) and give
    the plain forward's tokens."""
    path = tiny_model_dirs["llama"]
    rng = random.Random(10)
    prefix = [rng.randrange(384) for _ in range(48)]  # three full blocks of 16
    first = [prefix + [7, 8, 9]]
    later = [prefix + tail for tail in prompts(6, seed=11)]
    kw = dict(max_num_batched_tokens=96)
    plain = make_llm(path, **kw)
    pieces = make_llm(path, piecewise_max_tokens=128, **kw)
    for llm in (plain, pieces):
        llm.generate(first, GREEDY)
    want = plain.generate(later, GREEDY)
    runs_before = len(piece_runs)
    got = pieces.generate(later, GREEDY)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert len(piece_runs) > runs_before
    assert pieces.stats()["prefix_cache_hits"] > 0


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
    assert piece_runs == []  # the prefills had prompt logprobs; the rest were decode steps
    opt = make_llm(tiny_model_dirs["opt"], piecewise_max_tokens=256)
    assert opt.engine.runner.pieces is None
    assert opt.generate(batch, GREEDY)[0].token_ids


def test_buckets():
    assert piecewise_buckets(96) == [64, 96]
    assert piecewise_buckets(1024) == list(range(64, 1025, 64))
    buckets = piecewise_buckets(3000)
    assert buckets[16:24] == list(range(1152, 2049, 128))
    assert buckets[24:] == [2304, 2560, 2816, 3000]
