"""Greedy parity with HF transformers (fp32, CPU) on the same weights."""

import random

import pytest
import torch

from vllm_runner import LLM, SamplingParams

NUM_NEW = 32


def hf_greedy(model, prompt: list[int], num_new: int) -> list[int]:
    """HF's own greedy decoding (its KV cache, its forward), never stopping at EOS."""
    ids = torch.tensor([prompt])
    out, past = [], None
    with torch.no_grad():
        for _ in range(num_new):
            result = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = result.past_key_values
            token = int(result.logits[0, -1].argmax())
            out.append(token)
            ids = torch.tensor([[token]])
    return out


def random_prompts(num: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(3, 70))] for _ in range(num)]


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt"])
def test_tiny_models_match_hf(family, tiny_model_dirs):
    from transformers import AutoModelForCausalLM

    path = tiny_model_dirs[family]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = random_prompts(10, hf.config.vocab_size, seed=1)
    llm = LLM(path, dtype="float32", device="cpu", cpu_kv_cache_gb=0.05)
    outs = llm.generate(
        prompts, SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)
    )
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.prompt_token_ids == prompt
        assert out.token_ids == hf_greedy(hf, prompt, NUM_NEW)
        assert out.finish_reason == "length"
        assert out.text == ""  # no tokenizer in the folder: ids only


def test_default_model_matches_hf(smol_llm, default_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    hf = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    texts = [
        "The capital of France is",
        "Hi",
        "Write a haiku about the sea.",
        "1, 2, 3, 4,",
        "def fibonacci(n):",
        "Once upon a time in a small village there",
        "The quick brown fox",
        "Explain the benefits of AI in healthcare in detail, please.",
    ]
    outs = smol_llm.generate(
        texts, SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)
    )
    for text, out in zip(texts, outs, strict=True):
        prompt = tok.encode(text)
        assert out.prompt_token_ids == prompt
        expected = hf_greedy(hf, prompt, NUM_NEW)
        assert out.token_ids == expected
        assert out.text == tok.decode(expected, skip_special_tokens=True)
    assert outs[0].text.startswith(" Paris.")
