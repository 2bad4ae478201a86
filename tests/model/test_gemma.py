"""Sliding-window models against HF transformers (fp32, CPU): Gemma 2 (alternating windows,
soft-capped attention and logits), Gemma 3 text (q / k norms, a window on most layers, local
and global rotaries) and Mistral v0.1's window on every layer. Prompts run past the window of
24, in batches, in chunks and from the prefix cache; logprobs are HF's; what is refused."""

import random

import pytest
import torch
from test_parity import hf_greedy, saved_random_model

from vllm_runner import LLM, SamplingParams
from vllm_runner.config import EngineArgs
from vllm_runner.model.registry import resolve_model_class

WINDOW = 24
SHAPE = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             max_position_embeddings=512, sliding_window=WINDOW, bos_token_id=1, eos_token_id=2,
             pad_token_id=0)  # fmt: skip


def _config(family: str, **options):
    from transformers import Gemma2Config, Gemma3TextConfig, MistralConfig

    options = {**SHAPE, **options}
    if family == "gemma2":  # caps low enough to change every score and logit
        return Gemma2Config(query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                            final_logit_softcapping=3.0, architectures=["Gemma2ForCausalLM"],
                            **options)  # fmt: skip
    if family == "gemma3":  # layers sliding, sliding, full, sliding
        return Gemma3TextConfig(query_pre_attn_scalar=24, sliding_window_pattern=3,
                                rope_local_base_freq=1000.0, rope_theta=100000.0,
                                rope_scaling={"rope_type": "linear", "factor": 4.0},
                                architectures=["Gemma3ForCausalLM"], **options)  # fmt: skip
    return MistralConfig(tie_word_embeddings=False,
                         architectures=["MistralForCausalLM"], **options)  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """family -> (folder, HF model): random weights, the Gemma norms' weights spread around
    0 (their scale is 1 + weight), Gemma's tied embeddings small (std 0.02: scaled by
    sqrt(hidden) into the residual stream, larger ones make every step repeat the input
    token)."""
    out = {}
    for family in ("gemma2", "gemma3", "mistral"):
        path = tmp_path_factory.mktemp(family)
        hf = saved_random_model(_config(family), path)
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if "norm" in name:
                    p.uniform_(-0.5, 0.5)
                elif "embed" in name and family != "mistral":
                    p.normal_(0.0, 0.02)
        hf.save_pretrained(path)
        out[family] = (str(path), hf)
    return out


def _prompts(lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(384) for _ in range(n)] for n in lengths]


def _greedy(num: int, **options) -> SamplingParams:
    return SamplingParams(max_tokens=num, temperature=0.0, ignore_eos=True, **options)


FAMILIES = ["gemma2", "gemma3", "mistral"]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_match_hf_past_the_window(family, models):
    """A batch of prompts shorter and longer than the window, 24 new tokens each, in steps of
    32 tokens (long prompts prefill in chunks beside the others' decodes); then prompts that
    share the first ones' first 48 tokens start from the prefix cache."""
    path, hf = models[family]
    llm = LLM(path, dtype="float32", device="cpu", cpu_kv_cache_gb=0.05,
              max_num_batched_tokens=32)  # fmt: skip
    assert llm.engine.limits.max_model_len == 512  # not capped at the window
    batch = _prompts([5, 40, 70, 23, 24, 25, 57], seed=1)
    outs = llm.generate(batch, _greedy(24))
    assert [o.token_ids for o in outs] == [hf_greedy(hf, p, 24) for p in batch]
    if family != "mistral":
        assert len({t for o in outs for t in o.token_ids}) >= 20  # not the input repeated
    again = [batch[2][:48] + tail for tail in _prompts([9, 30], seed=2)]
    outs = llm.generate(again, _greedy(16))
    assert [o.num_cached_tokens for o in outs] == [48, 48]  # three blocks of 16 reused
    assert [o.token_ids for o in outs] == [hf_greedy(hf, p, 16) for p in again]


def test_the_window_changes_the_tokens(models, tmp_path):
    """The prompts above are long enough for the window to matter: HF's Mistral without it
    (the same weights) picks other tokens."""
    path, hf = models["mistral"]
    full = saved_random_model(_config("mistral", sliding_window=None), tmp_path)
    full.load_state_dict(hf.state_dict())
    prompt = _prompts([5, 40, 70], seed=1)[2]
    assert hf_greedy(full, prompt, 24) != hf_greedy(hf, prompt, 24)


@pytest.mark.parametrize("family", FAMILIES)
def test_logprobs_match_hf(family, models):
    """Prompt logprobs (HF's full forward, Gemma 2's logits soft-capped at 3: all within
    [-3, 3]) and the sampled tokens' top-3 logprobs (HF's step by step) within 1e-4."""
    path, hf = models[family]
    llm = LLM(path, dtype="float32", device="cpu", cpu_kv_cache_gb=0.05)
    prompt = _prompts([60], seed=3)[0]
    (out,) = llm.generate([prompt], _greedy(8, prompt_logprobs=3, logprobs=3))
    ids = prompt + out.token_ids
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].float()
    if family == "gemma2":
        assert logits.abs().max() <= 3.0
    ref = logits.log_softmax(-1)
    for pos in range(1, len(prompt)):
        for token, logprob in out.prompt_logprobs[pos].items():
            assert logprob == pytest.approx(ref[pos - 1, token].item(), abs=1e-4), (pos, token)
    for i, top in enumerate(out.outputs[0].logprobs):
        best = ref[len(prompt) - 1 + i].topk(3)
        assert set(top) >= set(best.indices.tolist())
        for token, logprob in top.items():
            want = ref[len(prompt) - 1 + i, token].item()
            assert logprob == pytest.approx(want, abs=1e-4), (i, token)


def test_layer_windows_and_rotaries(models):
    """Gemma 2 alternates (sliding first), Gemma 3 follows its pattern of 3, Mistral slides
    everywhere; Gemma 3's sliding layers share the local table, its full layers the global."""
    windows = {}
    for family in FAMILIES:
        llm = LLM(models[family][0], dtype="float32", device="cpu", cpu_kv_cache_gb=0.05)
        layers = llm.engine.runner.model.model.layers
        windows[family] = [layer.self_attn.attn.sliding_window for layer in layers]
        if family == "gemma3":
            tables = [layer.self_attn.rotary_emb.cos_sin_cache for layer in layers]
            assert tables[0] is tables[1] is tables[3] and tables[2] is not tables[0]
            hf_rotary, positions = models[family][1].model.rotary_emb, torch.arange(512)[None]
            for table, kind in ((tables[0], "sliding_attention"), (tables[2], "full_attention")):
                cos, sin = hf_rotary(torch.zeros(1), positions, kind)
                want = torch.cat([cos[0, :, :8], sin[0, :, :8]], 1)  # (HF: fp32 angles)
                torch.testing.assert_close(table, want, atol=1e-4, rtol=0)
    assert windows == {"gemma2": [WINDOW, 0, WINDOW, 0], "gemma3": [WINDOW, WINDOW, 0, WINDOW],
                       "mistral": [WINDOW] * 4}  # fmt: skip


def test_refusals(tmp_path):
    from transformers import Gemma3Config

    mm = Gemma3Config(architectures=["Gemma3ForConditionalGeneration"])
    refusal = r"^unsupported model architecture 'Gemma3ForConditionalGeneration': Gemma 3's "
    with pytest.raises(ValueError, match=refusal + "multimodal model"):
        resolve_model_class(mm)
    with pytest.raises(ValueError, match=r"^hidden_activation 'relu' is not supported by Gemma"):
        resolve_model_class(_config("gemma2"))(_config("gemma2", hidden_activation="relu"))
    bidirectional = _config("gemma3", use_bidirectional_attention=True)
    with pytest.raises(ValueError, match=r"^use_bidirectional_attention=True \(an embedding"):
        resolve_model_class(bidirectional)(bidirectional)


def test_max_model_len_past_the_window():
    """Models whose attention slides serve every position; a window of a model class that
    does not implement one (none registered now; an unknown config) still caps."""
    from types import SimpleNamespace

    for arch in ("MistralForCausalLM", "Gemma2ForCausalLM", "Phi3ForCausalLM"):
        config = SimpleNamespace(max_position_embeddings=32768, sliding_window=4096,
                                 architectures=[arch])  # fmt: skip
        assert EngineArgs().resolve_max_model_len(config) == 32768
    unknown = SimpleNamespace(max_position_embeddings=32768, sliding_window=4096)
    assert EngineArgs().resolve_max_model_len(unknown) == 4096
