"""Helpers shared by the engine tests (the llama_dir fixture is in conftest.py)."""

import random

from vllm_runner import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def prompts(num: int, seed: int = 0, vocab: int = 384) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(5, 60))] for _ in range(num)]


def make_llm(path: str, **kw) -> LLM:
    kw.setdefault("cpu_kv_cache_gb", 0.05)
    return LLM(path, dtype="float32", device="cpu", **kw)
