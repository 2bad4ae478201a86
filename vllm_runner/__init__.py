"""vllm-runner: a vLLM-class inference engine (paged KV cache, continuous batching)."""

import logging
import os

from vllm_runner.async_llm import AsyncLLM, EngineDeadError, RequestError
from vllm_runner.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from vllm_runner.config import EngineArgs
from vllm_runner.engine.input_processor import TextPrompt, TokensPrompt
from vllm_runner.engine.outputs import (
    CompletionOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    RequestOutput,
    StreamOutput,
)
from vllm_runner.llm import LLM
from vllm_runner.lora.request import LoRARequest
from vllm_runner.pooling_params import PoolerConfig, PoolingParams
from vllm_runner.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "AsyncLLM",
    "BeamSearchOutput",
    "BeamSearchParams",
    "BeamSearchSequence",
    "CompletionOutput",
    "EmbeddingOutput",
    "EmbeddingRequestOutput",
    "EngineArgs",
    "EngineDeadError",
    "LoRARequest",
    "PoolerConfig",
    "PoolingParams",
    "RequestError",
    "RequestOutput",
    "SamplingParams",
    "StreamOutput",
    "TextPrompt",
    "TokensPrompt",
]


class _UnlessRootHandles(logging.StreamHandler):
    """Prints the package's records only while the root logger has no handler: an app that
    configures logging (BentoML does) gets each line once, through its own handlers."""

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:
            super().emit(record)


_logger = logging.getLogger("vllm_runner")
if not _logger.handlers:  # engine start-up and warnings show unless the app configures logging
    _handler = _UnlessRootHandles()
    _handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    _logger.addHandler(_handler)
    _logger.setLevel(os.environ.get("VLLM_RUNNER_LOG_LEVEL", "INFO"))
