"""kv_cache_dtype="fp8": an e4m3 KV cache (half the bytes of bf16), on CPU through the
torch reference; the Triton kernels' fp8 paths are in tests/kernels and the GPU suite."""

import random

import pytest
import torch

from vllm_runner import LLM, SamplingParams

FP8 = torch.float8_e4m3fn


def prompts(num: int, seed: int = 0, vocab: int = 384) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(5, 60))] for _ in range(num)]


@pytest.fixture(scope="module")
def peaked_dir(tmp_path_factory, peaked_llama) -> str:
    """The tiny Llama's shape with peaked logits (a large output projection)."""
    return peaked_llama(
        str(tmp_path_factory.mktemp("peaked_llama")), ("embed", "lm_head"), vocab_size=384,
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512,
    )  # fmt: skip


def make_llm(path: str, **kw) -> LLM:
    return LLM(path, dtype="float32", device="cpu", num_kv_blocks=64, **kw)


def first_difference_in_top5(a, b) -> None:
    """Greedy tokens equal, or where they first differ each side's token is in the other's
    top-5 (``logprobs=5`` on both)."""
    if a.token_ids == b.token_ids:
        return
    i = next(j for j, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=True)) if x != y)
    assert a.token_ids[i] in b.outputs[0].logprobs[i]
    assert b.token_ids[i] in a.outputs[0].logprobs[i]


def test_fp8_cache_holds_rounded_kv_in_a_quarter_of_fp32(peaked_dir):
    path = peaked_dir
    full, fp8 = make_llm(path), make_llm(path, kv_cache_dtype="fp8")
    full_layer = full.engine.runner.attn_layers[0]
    fp8_layer = fp8.engine.runner.attn_layers[0]
    assert full_layer.k_cache.dtype == torch.float32 and fp8_layer.k_cache.dtype == FP8
    assert fp8_layer.v_cache.dtype == FP8 and fp8_layer.k_cache.shape == full_layer.k_cache.shape
    # same block count, a quarter of the bytes
    assert full.stats()["kv_cache_bytes"] == 4 * fp8.stats()["kv_cache_bytes"]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=5)
    batch = prompts(6)
    full_outs, fp8_outs = full.generate(batch, params), fp8.generate(batch, params)
    for a, b in zip(full_outs, fp8_outs, strict=True):
        assert len(b.token_ids) == 16 and b.finish_reason == "length"
        first_difference_in_top5(a, b)
    # what the cache holds is the fp32 cache's content rounded to e4m3 (same prompt, fresh
    # engines with one request: the same blocks)
    one = [batch[0]]
    full1, fp81 = make_llm(path), make_llm(path, kv_cache_dtype="fp8")
    short = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    full1.generate(one, short), fp81.generate(one, short)
    n = len(batch[0])
    layer0_full = full1.engine.runner.attn_layers[0].k_cache.view(-1, *full_layer.k_cache.shape[2:])
    layer0_fp8 = fp81.engine.runner.attn_layers[0].k_cache.view(-1, *fp8_layer.k_cache.shape[2:])
    written = (layer0_full.abs().sum((1, 2)) > 0).nonzero()[:, 0]
    assert len(written) == n  # the prompt's keys (the sampled token's is not cached yet)
    rounded = layer0_full[written].to(FP8).view(torch.uint8)
    assert torch.equal(layer0_fp8.view(torch.uint8)[written], rounded)
    # (layer 0 only: later layers' inputs already differ by the rounding of earlier ones)
    shape = full_layer.v_cache.shape[2:]
    v_full = full1.engine.runner.attn_layers[0].v_cache.view(-1, *shape)[written]
    v_fp8 = fp81.engine.runner.attn_layers[0].v_cache.view(-1, *shape)[written]
    assert torch.equal(v_fp8.view(torch.uint8), v_full.to(FP8).view(torch.uint8))


def test_fp8_cache_batch_invariance_and_prefix_cache(tiny_model_dirs):
    """Alone, batched and chunked give the same tokens on an fp8 cache too, and a prefix-cache
    hit (keys read back from fp8 blocks) equals the cold run."""
    path = tiny_model_dirs["llama"]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    batch = prompts(8, seed=3)
    alone = make_llm(path, kv_cache_dtype="fp8").generate([batch[5]], params)[0].token_ids
    llm = make_llm(path, kv_cache_dtype="fp8", max_num_batched_tokens=9)
    assert llm.generate(batch, params)[5].token_ids == alone
    again = llm.generate([batch[5]], params)[0]
    assert again.token_ids == alone and again.num_cached_tokens > 0


def test_bad_kv_cache_dtype_names_the_choices(tiny_model_dirs):
    with pytest.raises(ValueError, match=r"kv_cache_dtype must be one of .*'fp8'.*got 'int4'"):
        make_llm(tiny_model_dirs["llama"], kv_cache_dtype="int4")


def test_kv_cache_dtype_resolution_and_old_gpus(monkeypatch):
    """ "fp8" and "fp8_e4m3" are e4m3, "auto" the model's dtype; a CUDA device below compute
    capability 8.9 (no fp8 conversions) is refused before any weight is loaded."""
    from vllm_runner.config import CacheConfig
    from vllm_runner.worker.memory import kv_cache_dtype

    def cache(name: str) -> CacheConfig:
        return CacheConfig(16, True, 0.9, None, 1.0, 0.0, kv_cache_dtype=name)

    cpu = torch.device("cpu")
    assert kv_cache_dtype(cache("auto"), torch.bfloat16, cpu) == torch.bfloat16
    assert kv_cache_dtype(cache("fp8"), torch.bfloat16, cpu) == FP8
    assert kv_cache_dtype(cache("fp8_e4m3"), torch.float32, cpu) == FP8
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 0))
    with pytest.raises(ValueError, match=r"compute capability 8\.9 or newer.*this one is 8\.0"):
        kv_cache_dtype(cache("fp8"), torch.bfloat16, torch.device("cuda"))
    assert kv_cache_dtype(cache("auto"), torch.bfloat16, torch.device("cuda")) == torch.bfloat16
