"""vllm-runner: a vLLM-class inference engine (paged KV cache, continuous batching)."""

from vllm_runner.async_llm import AsyncLLM, RequestError
from vllm_runner.config import EngineArgs
from vllm_runner.engine.outputs import CompletionOutput, RequestOutput, StreamOutput
from vllm_runner.llm import LLM
from vllm_runner.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "AsyncLLM",
    "CompletionOutput",
    "EngineArgs",
    "RequestError",
    "RequestOutput",
    "SamplingParams",
    "StreamOutput",
]
