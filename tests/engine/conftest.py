"""Fixtures of the engine tests."""

import asyncio

import pytest

from vllm_runner import AsyncLLM


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dirs) -> str:
    return tiny_model_dirs["llama"]


@pytest.fixture(scope="module")
def tiny_async(llama_dir):
    """A float32 AsyncLLM on the tiny Llama, one per module."""
    llm = AsyncLLM(llama_dir, dtype="float32", device="cpu", cpu_kv_cache_gb=0.05)
    yield llm
    asyncio.run(llm.shutdown())
