"""Qwen3 (per-head q/k norms) and Phi-3 (fused checkpoint tensors, LongRoPE, a partial rotary,
a sliding window) against HF transformers (fp32, CPU), beyond test_parity.py's greedy tokens:
lone requests, logprobs, steps in pieces, the positions each serves, and what is refused."""

import math
import random
from types import SimpleNamespace

import pytest
import torch
from test_parity import hf_greedy, saved_random_model

from vllm_runner import LLM, SamplingParams
from vllm_runner.model.llama import llama_rotary
from vllm_runner.model.registry import resolve_model_class
from vllm_runner.worker.piecewise_graphs import PiecewiseGraphs


def _prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(384) for _ in range(n)] for n in lengths]


def _greedy(num: int) -> SamplingParams:
    return SamplingParams(max_tokens=num, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("family", ["qwen3", "phi3"])
def test_lone_requests_and_prompt_logprobs_match_hf(family, tiny_model_dirs):
    """Each prompt alone (every decode step a lone row) gets HF's greedy tokens; its prompt
    logprobs (the prompt token's and the top 3 at each position) are HF's full forward's
    within 1e-4, as tests/engine/test_sampling.py holds the Llama's."""
    from transformers import AutoModelForCausalLM

    path = tiny_model_dirs[family]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(path, dtype="float32", device="cpu", cpu_kv_cache_gb=0.05)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, prompt_logprobs=3)
    for prompt in _prompts([3, 29, 64], seed=5):
        (out,) = llm.generate([prompt], params)
        assert out.token_ids == hf_greedy(hf, prompt, 16)
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
        assert out.prompt_logprobs[0] is None
        for pos, top in enumerate(out.prompt_logprobs[1:], start=1):
            want = {prompt[pos]: ref[pos - 1, prompt[pos]].item()}
            best = ref[pos - 1].topk(3)
            want.update(zip(best.indices.tolist(), best.values.tolist(), strict=True))
            assert top.keys() == want.keys(), pos
            for token, logprob in want.items():
                assert top[token] == pytest.approx(logprob, abs=1e-4), (pos, token)


@pytest.mark.parametrize("family", ["qwen3", "phi3"])
def test_steps_in_pieces_match_hf(family, tiny_model_dirs, monkeypatch):
    """Steps that prefill run in the piecewise graphs' pieces (eagerly on CPU: the pieces a
    GPU captures, Qwen3's q/k norms inside them, attention between them): HF's tokens."""
    from transformers import AutoModelForCausalLM

    runs = []
    run = PiecewiseGraphs.run
    monkeypatch.setattr(PiecewiseGraphs, "run", lambda self, *a: runs.append(a[1]) or run(self, *a))
    path = tiny_model_dirs[family]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(path, dtype="float32", device="cpu", cpu_kv_cache_gb=0.05,
              max_num_batched_tokens=96, piecewise_max_tokens=128)  # fmt: skip
    batch = _prompts([5, 40, 61, 17, 90, 33], seed=6)
    outs = llm.generate(batch, _greedy(12))
    assert [out.token_ids for out in outs] == [hf_greedy(hf, prompt, 12) for prompt in batch]
    assert runs  # steps ran in pieces


def _phi3_config(**options):
    from transformers import Phi3Config

    shape = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                 bos_token_id=1, eos_token_id=2, pad_token_id=0,
                 architectures=["Phi3ForCausalLM"])  # fmt: skip
    return Phi3Config(**shape, **options)


def _longrope(rotary_half: int, original: int = 128) -> dict:
    """Phi-3.5-mini's rope_scaling, scaled down: per-frequency short and long factors."""
    short = [1.0 + 0.05 * i for i in range(rotary_half)]
    long = [1.0 + 1.5 * i for i in range(rotary_half)]
    return dict(rope_scaling={"type": "longrope", "short_factor": short, "long_factor": long},
                original_max_position_embeddings=original)  # fmt: skip


def test_phi3_sliding_window(tmp_path):
    """Phi-3-mini-4k's window (2047 of 4096 positions), scaled down to 100 of 512: every
    layer attends within it (HF masks every layer by it), so the engine serves all 512
    positions with HF's tokens past the window."""
    hf = saved_random_model(_phi3_config(sliding_window=100), tmp_path)
    llm = LLM(str(tmp_path), dtype="float32", device="cpu", cpu_kv_cache_gb=0.05)
    assert llm.engine.limits.max_model_len == 512
    assert {layer.self_attn.attn.sliding_window
            for layer in llm.engine.runner.model.model.layers} == {100}  # fmt: skip
    batch = _prompts([150, 50, 7], seed=7)
    outs = llm.generate(batch, _greedy(16))
    assert [out.token_ids for out in outs] == [hf_greedy(hf, prompt, 16) for prompt in batch]


@pytest.mark.parametrize("max_model_len, factors", [(128, "short"), (129, "long"), (None, "long")])
def test_longrope_tables_match_hf(max_model_len, factors):
    """Phi-3.5 / Phi-4-mini's LongRoPE over half of each head (partial_rotary_factor 0.5):
    an engine within the original 128 positions rotates by the short factors, one past them
    by the long ones at every position; either table equals HF's rotary embedding for a
    sequence of that kind (HF picks the factors by the sequence's length), attention factor
    (sqrt(1 + ln 4 / ln 128)) included."""
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    config = _phi3_config(partial_rotary_factor=0.5, **_longrope(4))
    table = llama_rotary(config, max_model_len).cos_sin_cache
    assert table.shape == (512, 8)  # rotary_dim 8 of head_dim 16
    length = 128 if factors == "short" else 512  # HF: short up to 128 positions, else long
    cos, sin = Phi3RotaryEmbedding(config)(torch.zeros(1), torch.arange(length)[None])
    torch.testing.assert_close(table[:length, :4], cos[0, :, :4], rtol=0, atol=5e-5)
    torch.testing.assert_close(table[:length, 4:], sin[0, :, :4], rtol=0, atol=5e-5)
    assert table[0, 0].item() == pytest.approx(math.sqrt(1 + math.log(4) / math.log(128)))


def test_longrope_engines_match_hf(tmp_path):
    """A LongRoPE Phi-3 with a partial rotary (Phi-4-mini's layout, scaled down): an engine
    capped at the original 128 positions gives HF's tokens (short factors on both sides);
    the default engine (512 positions: long factors) gives HF's tokens for prompts past 128
    (HF's long factors from the prompt on)."""
    hf = saved_random_model(_phi3_config(partial_rotary_factor=0.5, **_longrope(4)), tmp_path)
    short = LLM(str(tmp_path), dtype="float32", device="cpu", cpu_kv_cache_gb=0.05,
                max_model_len=128)  # fmt: skip
    batch = _prompts([100, 40, 9], seed=8)
    outs = short.generate(batch, _greedy(16))
    assert [out.token_ids for out in outs] == [hf_greedy(hf, prompt, 16) for prompt in batch]
    long = LLM(str(tmp_path), dtype="float32", device="cpu", cpu_kv_cache_gb=0.05)
    assert long.engine.limits.max_model_len == 512
    batch = _prompts([129, 200, 300], seed=9)
    outs = long.generate(batch, _greedy(16))
    assert [out.token_ids for out in outs] == [hf_greedy(hf, prompt, 16) for prompt in batch]


def test_longrope_factors_of_another_length_are_refused():
    config = SimpleNamespace(hidden_size=64, num_attention_heads=4, max_position_embeddings=512,
                             original_max_position_embeddings=128,
                             rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 8,
                                           "long_factor": [1.0] * 6})  # fmt: skip
    with pytest.raises(
        ValueError,
        match=r"^rope_scaling type 'longrope' needs long_factor of 8 values "
        r"\(rotary_dim // 2\), got 6$",
    ):
        llama_rotary(config)


@pytest.mark.parametrize(
    "config",
    [
        SimpleNamespace(architectures=["Qwen3NextForCausalLM"], model_type="qwen3_next"),
        SimpleNamespace(model_type="qwen3_next"),  # no architectures: by model type
        SimpleNamespace(architectures=["Phi3SmallForCausalLM"], model_type="phi3small"),
    ],
)
def test_other_qwen3_and_phi3_architectures_are_refused(config):
    """Qwen3-Next and Phi-3-small are other layouts (linear attention; block-sparse
    attention): refused naming what is served, not loaded into the dense classes."""
    with pytest.raises(ValueError, match=r"^unsupported model ") as error:
        resolve_model_class(config)
    for served in ("'Phi3ForCausalLM'", "'Qwen2ForCausalLM'", "'Qwen3ForCausalLM'",
                   "'Qwen3MoeForCausalLM'"):  # fmt: skip
        assert served in str(error.value)
    assert "'phi3', 'qwen2', 'qwen2_moe', 'qwen3', 'qwen3_moe'" in str(error.value)
