"""LoRA on the GPU (run on the device machine: pytest -m gpu tests/model/test_gpu_lora.py):
the adapters' term inside decode CUDA graphs and piecewise graphs gives the tokens of the
same steps run eagerly, and stays close to the merged weights."""

import random

import pytest
import torch
from lora_testing import merge_adapter, write_adapter

from vllm_runner import LLM, LoRARequest, SamplingParams

pytestmark = pytest.mark.gpu
VOCAB = 1024


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, peaked_llama) -> str:
    if not torch.cuda.is_available():
        pytest.fail("the gpu suite needs a CUDA device")
    return peaked_llama(
        str(tmp_path_factory.mktemp("lora_llama")), ("embed", "lm_head"), vocab_size=VOCAB,
        hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def loras(model_dir, tmp_path_factory) -> list[LoRARequest]:
    root = tmp_path_factory.mktemp("gpu_loras")
    return [
        LoRARequest("a", 1, write_adapter(str(root / "a"), model_dir, rank=8, seed=1, std=0.1)),
        LoRARequest(
            "b",
            2,
            write_adapter(str(root / "b"), model_dir, rank=16, seed=2, std=0.1, use_rslora=True),
        ),  # fmt: skip
    ]


def gpu_llm(path: str, **kw) -> LLM:
    kw.setdefault("gpu_memory_utilization", 0.15)
    return LLM(path, device="cuda", dtype="bfloat16", max_model_len=1024, **kw)


def batch() -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(VOCAB) for _ in range(rng.randint(2, 200))] for _ in range(12)]


@pytest.mark.parametrize("piecewise_max_tokens", [0, 256])
def test_lora_in_cuda_graphs_matches_eager(model_dir, loras, piecewise_max_tokens):
    """A mixed batch (adapter a, adapter b, none) whose requests end at different steps:
    decode graphs of several sizes replayed with different slot rows, and (256) prefill steps
    in piecewise graphs, against the same padded calls run eagerly."""
    kw = dict(enable_lora=True, max_loras=2, max_num_batched_tokens=256,
              piecewise_max_tokens=piecewise_max_tokens)  # fmt: skip
    graphs = gpu_llm(model_dir, **kw)
    assert graphs.engine.runner.graphs.graphs
    eager = gpu_llm(model_dir, enforce_eager=True, **kw)
    prompts = batch()
    params = [SamplingParams(max_tokens=24 - 3 * (i % 4), temperature=0.0, ignore_eos=True)
              for i in range(len(prompts))]  # fmt: skip
    per_prompt = [[*loras, None][i % 3] for i in range(len(prompts))]
    got = graphs.generate(prompts, params, lora_request=per_prompt)
    want = eager.generate(prompts, params, lora_request=per_prompt)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]


def test_lora_on_the_gpu_stays_close_to_the_merged_weights(model_dir, loras, tmp_path):
    """bf16: greedy tokens equal the merged model's, or where they first differ each is in
    the other's top-5 (the adapter's term is rounded apart from the weight)."""
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=5)
    prompts = batch()[:6]
    lora_llm = gpu_llm(model_dir, enable_lora=True)
    for lora in loras:
        merged = gpu_llm(merge_adapter(model_dir, lora.lora_path, str(tmp_path / lora.lora_name)))
        want = merged.generate(prompts, params)
        got = lora_llm.generate(prompts, params, lora_request=lora)
        del merged
        for a, b in zip(got, want, strict=True):
            ta, tb = a.outputs[0].token_ids, b.outputs[0].token_ids
            i = next((j for j, (x, y) in enumerate(zip(ta, tb, strict=True)) if x != y), None)
            if i is not None:
                assert ta[i] in b.outputs[0].logprobs[i] and tb[i] in a.outputs[0].logprobs[i]
