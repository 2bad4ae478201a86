"""GPU checks of the sliding-window models (run on the device machine: pytest -m gpu): Gemma 2
(soft-caps, head_dim 256), Gemma 3 text and Mistral's window, prompts well past a window of
128. bf16 close to HF on every CUDA path (batched prefill, decode graphs, a lone request);
fp32 equal to the CPU reference path (the decode kernel's window, split-K and fused rotary,
chunked prefill)."""

import random

import pytest
import torch
from test_gpu import first_difference_in_top5

from vllm_runner import LLM, SamplingParams

pytestmark = pytest.mark.gpu
NUM_NEW = 32  # (first_difference_in_top5's)
FAMILIES = ["gemma2", "gemma3", "mistral"]


def _config(family: str, vocab: int, hidden: int, layers: int):
    from transformers import Gemma2Config, Gemma3TextConfig, MistralConfig

    shape = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                 num_hidden_layers=layers, max_position_embeddings=2048, sliding_window=128,
                 bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    if family == "gemma2":  # Gemma-2-9B's heads: 16 of 256 features, 8 kv heads
        return Gemma2Config(num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                            query_pre_attn_scalar=256, architectures=["Gemma2ForCausalLM"],
                            **shape)  # fmt: skip
    if family == "gemma3":  # Gemma-3-4B's: 8 of 256, 4 kv heads; 5 sliding layers to 1 full
        return Gemma3TextConfig(num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                                query_pre_attn_scalar=256,
                                rope_scaling={"rope_type": "linear", "factor": 8.0},
                                architectures=["Gemma3ForCausalLM"], **shape)  # fmt: skip
    return MistralConfig(num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                         architectures=["MistralForCausalLM"], **shape)  # fmt: skip


def _save(config, path, dtype: torch.dtype, other_std: float) -> str:
    """Random weights with peaked logits (Mistral's embedding std 1.0; Gemma's tied ones,
    scaled by sqrt(hidden), 0.02, else every step repeats the input token), norm weights
    spread."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    embed_std = 1.0 if config.model_type == "mistral" else 0.02
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, embed_std if "embed" in name else other_std)
            elif "norm" in name:
                p.uniform_(-0.3, 0.3)
    model.save_pretrained(path)
    return str(path)


def _prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(vocab) for _ in range(rng.randint(2, 600))] for _ in range(12)]


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_greedy_close_to_hf(family, tmp_path):
    """A batch (prefill, batched decode in CUDA graphs) and a lone request: HF's greedy
    tokens, or where they first differ each side's token is among the other's top-5."""
    from transformers import AutoModelForCausalLM

    path = _save(_config(family, 32768, 768, 12), tmp_path, torch.bfloat16, 0.05)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    params = SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True, logprobs=5)
    llm = LLM(path, device="cuda", dtype="bfloat16", gpu_memory_utilization=0.2)
    batch = _prompts(32768)
    for prompt, out in zip(batch, llm.generate(batch, params), strict=True):
        first_difference_in_top5(hf, prompt, out)
    (out,) = llm.generate([batch[1]], params)
    first_difference_in_top5(hf, batch[1], out)


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_on_the_gpu_matches_the_cpu(family, tmp_path):
    """fp32 on both sides: the same greedy tokens for a batch, a lone request (split-K decode
    over the window) and prompts chunked in steps of 256 tokens."""
    path = _save(_config(family, 4096, 256, 4), tmp_path, torch.float32, 0.1)
    params = SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)
    batch = [[t % 4096 for t in p] for p in _prompts(4096)[:8]]
    cpu = LLM(path, dtype="float32", device="cpu", num_kv_blocks=512)
    want = [o.token_ids for o in cpu.generate(batch, params)]
    for kw in ({}, {"max_num_batched_tokens": 256, "piecewise_max_tokens": 256}):
        gpu = LLM(path, dtype="float32", device="cuda", num_kv_blocks=512, **kw)
        assert [o.token_ids for o in gpu.generate(batch, params)] == want, kw
        assert gpu.generate(batch[:1], params)[0].token_ids == want[0], kw
        del gpu
