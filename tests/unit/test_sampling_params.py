"""SamplingParams read as vLLM reads them (each found in review)."""

from vllm_runner import LLM, SamplingParams


def test_seed_minus_1_means_no_seed(tiny_model_dirs):
    """vLLM (and OpenAI's API) read seed=-1 as "no seed": a random draw each request. It was
    the fixed seed -1, so every request sent with it drew the same tokens."""
    assert SamplingParams(seed=-1).seed is None
    assert SamplingParams(seed=-2).seed == -2 and SamplingParams(seed=0).seed == 0
    llm = LLM(tiny_model_dirs["llama"], dtype="float32", device="cpu", cpu_kv_cache_gb=0.05)
    params = SamplingParams(seed=-1, max_tokens=8, ignore_eos=True)
    runs = {tuple(llm.generate([[5, 17, 42, 99]], params)[0].token_ids) for _ in range(3)}
    assert len(runs) > 1
