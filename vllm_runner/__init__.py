"""vllm-runner: a vLLM-class inference engine (paged KV cache, continuous batching)."""

import logging
import os

from vllm_runner.async_llm import AsyncLLM, EngineDeadError, RequestError
from vllm_runner.config import EngineArgs
from vllm_runner.engine.outputs import CompletionOutput, RequestOutput, StreamOutput
from vllm_runner.llm import LLM
from vllm_runner.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "AsyncLLM",
    "CompletionOutput",
    "EngineArgs",
    "EngineDeadError",
    "RequestError",
    "RequestOutput",
    "SamplingParams",
    "StreamOutput",
]

_logger = logging.getLogger("vllm_runner")
if not _logger.handlers:  # engine start-up and warnings show unless the app configures logging
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    _logger.addHandler(_handler)
    _logger.setLevel(os.environ.get("VLLM_RUNNER_LOG_LEVEL", "INFO"))
