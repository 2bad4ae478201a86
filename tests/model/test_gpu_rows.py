"""GPU: decode steps of a few requests on the few-row GEMV (kernels/gemv_rows.py)."""

import pytest
import torch
from test_gpu import NUM_NEW, first_difference_in_top5, gpu_llm, prompts

import kernels.gemv_rows
from vllm_runner import SamplingParams

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("reqs", [2, 3, 8])
def test_few_requests_fused_rows(model_dir, monkeypatch, reqs):
    """A few requests decoding together (3: a graph of 4 with a padding row) run each layer
    as GEMVs of 2, 4 or 8 rows with the norms, residual adds and SiLU inside, and the LM
    head on the same kernel: each request within HF's top-5 where its tokens first differ,
    identical in CUDA graphs and eagerly, the few-row path really taken."""
    from transformers import AutoModelForCausalLM

    calls = []
    real = kernels.gemv_rows.linear_rows

    def spy(x, *args, **kw):
        calls.append(x.shape[0])
        return real(x, *args, **kw)

    monkeypatch.setattr(kernels.gemv_rows, "linear_rows", spy)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    params = SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True, logprobs=5)
    graphs = gpu_llm(model_dir, gpu_memory_utilization=0.2)
    eager = gpu_llm(model_dir, gpu_memory_utilization=0.2, enforce_eager=True)
    batch = prompts()[:reqs]
    calls.clear()
    outs = eager.generate(batch, params)
    bucket = 4 if reqs == 3 else reqs
    # 30 layers x 4 GEMVs + the LM head a decode step (the first steps may still prefill)
    assert calls.count(bucket) >= (30 * 4 + 1) * (NUM_NEW - 4), (bucket, len(calls))
    assert [o.token_ids for o in graphs.generate(batch, params)] == [o.token_ids for o in outs]
    for prompt, out in zip(batch, outs, strict=True):
        first_difference_in_top5(hf, prompt, out)
