"""Fixtures of the engine tests."""

import asyncio

import pytest
import torch

from vllm_runner import LLM, AsyncLLM


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dirs) -> str:
    return tiny_model_dirs["llama"]


@pytest.fixture(scope="module")
def tiny_async(llama_dir):
    """A float32 AsyncLLM on the tiny Llama, one per module."""
    llm = AsyncLLM(llama_dir, dtype="float32", device="cpu", cpu_kv_cache_gb=0.05)
    yield llm
    asyncio.run(llm.shutdown())


@pytest.fixture(scope="session")
def smol_engines(smol_llm, default_model_dir) -> dict[str, LLM]:
    """The default model on CPU, stepping synchronously ("sync": ``smol_llm``) and under async
    scheduling ("async": its newest sampled token still on the device when the next step
    samples), for tests that check a sampling setting both ways."""
    overlapped = LLM(default_model_dir, dtype="float32", device="cpu", max_model_len=1024,
                     cpu_kv_cache_gb=0.25, async_scheduling=True)  # fmt: skip
    return {"sync": smol_llm, "async": overlapped}


@pytest.fixture(scope="module")
def hf_smol(default_model_dir):
    """HF transformers' model on the default model's weights (fp32), for greedy parity of
    the engine's guided outputs (each step's best allowed token)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
