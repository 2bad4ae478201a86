"""Server settings: `bentoml serve --arg key=value` over `VLLM_RUNNER_<KEY>` over defaults."""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_runner.serving.models_api import parse_lora_modules
from vllm_runner.serving.reasoning_parsers import get_reasoning_parser
from vllm_runner.serving.tool_formats import get_tool_parser

logger = logging.getLogger(__name__)
ENV_PREFIX = "VLLM_RUNNER_"
# read by the engine itself: the default model's cache, GPU kernel switches, logging
ENGINE_ENV = frozenset(
    ENV_PREFIX + n for n in ("CACHE", "GEMV", "PDL", "SAMPLE_SPLIT", "LOG_LEVEL")
)
# Settings passed straight to AsyncLLM when set; None leaves the engine's default.
ENGINE_FIELDS = (
    "dtype",
    "device",
    "max_model_len",
    "max_num_seqs",
    "max_num_batched_tokens",
    "block_size",
    "num_kv_blocks",
    "enable_prefix_caching",
    "gpu_memory_utilization",
    "cpu_kv_cache_gb",
    "cpu_offload_gb",
    "quantization",
    "kv_cache_dtype",
    "enforce_eager",
    "admission_interval",
    "scheduling_policy",
    "piecewise_max_tokens",
    "seed",
    "generation_config",
    "pooler_config",
    "enable_lora",
    "max_loras",
    "max_lora_rank",
    "max_cpu_loras",
)
_VLLM_LORA_UPDATES = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"  # (vLLM's name, read too)
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class ServerSettings:
    """Everything the service reads at start-up; see docs/serving.md for the meaning."""

    model: str | None = None  # HF folder / id; None = the default model (SmolLM2-135M)
    served_model_name: str | None = None  # name in /v1/models; None = the engine's
    dtype: str | None = None
    device: str | None = None
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    block_size: int | None = None
    num_kv_blocks: int | None = None
    enable_prefix_caching: bool | None = None
    gpu_memory_utilization: float | None = None
    cpu_kv_cache_gb: float | None = None  # KV cache size when running on CPU
    cpu_offload_gb: float | None = None
    quantization: str | None = None
    kv_cache_dtype: str | None = None  # "auto" (the model's) or "fp8" / "fp8_e4m3"
    enforce_eager: bool | None = None  # no CUDA graphs
    admission_interval: int | None = None  # waiting requests join every N-th decode step
    scheduling_policy: str | None = None  # "fcfs" or "priority" (requests' own priority)
    piecewise_max_tokens: int | None = None  # steps that prefill in piecewise CUDA graphs
    seed: int | None = None
    generation_config: str | None = None  # "auto": the model's sampling defaults; "vllm"; a folder
    pooler_config: str | None = None  # /v1/embeddings' pooling, JSON: {"pooling_type": "MEAN"}
    engine_process: bool | None = None  # engine core in its own process; None = on CUDA
    enable_lora: bool | None = None  # requests may name a LoRA adapter as their model
    max_loras: int | None = None  # distinct adapters a step runs
    max_lora_rank: int | None = None
    max_cpu_loras: int | None = None  # adapters kept loaded in CPU memory
    lora_modules: str | None = None  # "name=path name2=path2" (or JSON): adapters served by name
    # POST /v1/load_lora_adapter and /v1/unload_lora_adapter (also vLLM's env variable
    # VLLM_ALLOW_RUNTIME_LORA_UPDATING)
    allow_runtime_lora_updating: bool = False
    api_key: str | None = None
    # chat's tool_choice "auto" parses calls: "hermes", "llama3_json", "mistral", "pythonic"
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None  # "deepseek_r1", "qwen3": chat's reasoning_content
    trust_request_chat_template: bool = False  # chat requests may bring a chat_template
    gpus: int = 0  # GPUs BentoML reserves per worker (0: none declared, the engine picks)
    workers: int = 1
    max_concurrency: int = 64  # per service; over it BentoML answers 429
    timeout: int = 600  # seconds to the first byte of a response
    max_batch_size: int = 32  # adaptive batching of /complete and /score
    max_latency_ms: int = 300_000

    def __post_init__(self) -> None:
        for name in ("workers", "max_concurrency", "timeout", "max_latency_ms"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_batch_size < 2:
            raise ValueError(f"max_batch_size must be >= 2, got {self.max_batch_size}")
        if self.gpus < 0:
            raise ValueError(f"gpus must be >= 0, got {self.gpus}")
        get_tool_parser(self.tool_call_parser)  # a ValueError naming the known ones
        get_reasoning_parser(self.reasoning_parser)
        if self.lora_requests() and not self.enable_lora:
            raise ValueError(f"lora_modules {self.lora_modules!r} needs enable_lora=true")
        # Engine settings are checked now, not in the loader thread after start-up, so that a
        # bad value stops `bentoml serve` instead of leaving a server that answers 503.
        from vllm_runner.config import EngineArgs

        engine = {k: getattr(self, k) for k in ENGINE_FIELDS if getattr(self, k) is not None}
        EngineArgs(**engine).validate()

    @classmethod
    def load(
        cls, env: Mapping[str, str], args: Mapping[str, Any], argv: Sequence[str] = ()
    ) -> ServerSettings:
        """Read settings from `args` (bentoml --arg), then `env`, then the defaults.
        ``argv``: the process's command line, to catch `--arg`s that BentoML dropped."""
        hints = typing.get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls)}
        _check_cli_args(argv, args)
        unknown = sorted(set(args) - fields)
        if unknown:
            raise ValueError(
                f"unknown --arg {', '.join(unknown)}; known: {', '.join(sorted(fields))}"
            )
        _warn_unknown_env(env, fields)
        values: dict[str, Any] = {}
        for name in fields:
            source = f"--arg {name}"
            raw = args.get(name)
            if raw is None:
                source = ENV_PREFIX + name.upper()
                raw = env.get(source)
            if raw is None or raw == "":
                continue
            values[name] = _convert(raw, hints[name], source)
            if name == "api_key":
                _check_api_key(values[name], source)
        vllm_switch = env.get(_VLLM_LORA_UPDATES, "")
        if "allow_runtime_lora_updating" not in values and vllm_switch:
            values["allow_runtime_lora_updating"] = _convert(vllm_switch, bool, _VLLM_LORA_UPDATES)
        return cls(**values)

    def lora_requests(self) -> list:
        """The ``lora_modules`` setting's adapters (``models_api.parse_lora_modules``)."""
        return parse_lora_modules(self.lora_modules)

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for AsyncLLM besides `model`: those that are set."""
        kwargs = {k: getattr(self, k) for k in ENGINE_FIELDS if getattr(self, k) is not None}
        if self.served_model_name:
            kwargs["served_model_name"] = self.served_model_name
        if self.engine_process is not None:
            kwargs["engine_process"] = self.engine_process
        if self.workers > 1 and self._engine_apart():
            kwargs["shared_engine"] = shared_engine_name()
        return kwargs

    def _engine_apart(self) -> bool:
        """Whether AsyncLLM runs the engine in a process of its own (None: on CUDA)."""
        if self.engine_process is not None:
            return self.engine_process
        from vllm_runner.config import EngineArgs

        return EngineArgs(device=self.device or "auto").engine_apart_by_default()


def shared_engine_name() -> str:
    """What the workers of one server (children of one `bentoml serve`) that see the same
    GPUs call their engine: they share it (several HTTP workers, one copy of the weights)."""
    return f"bentoml-{os.getppid()}-gpus-{os.environ.get('CUDA_VISIBLE_DEVICES', 'all')}"


def _warn_unknown_env(env: Mapping[str, str], fields: set[str]) -> None:
    """Name the VLLM_RUNNER_* variables nothing reads (a misspelt setting), as vLLM does."""
    known = {ENV_PREFIX + name.upper() for name in fields} | ENGINE_ENV
    for name in sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in known):
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        logger.warning("unknown environment variable %s%s: ignored", name, hint)


def _check_cli_args(argv: Sequence[str], args: Mapping[str, Any]) -> None:
    """Stop when a `bentoml` command line's `--arg` did not reach the service.

    NOTE: serving a built bento (`bentoml serve <tag>`, and the container's entrypoint),
    BentoML (1.4) hands the service the arguments recorded by `bentoml build`, not the
    command line's: `--arg api_key=...` would serve without a key, and say nothing.
    """
    if not argv or "bentoml" not in Path(argv[0]).parts[-2:]:  # bentoml, bentoml/__main__.py
        return
    # NOTE: every value given per key: which one BentoML keeps depends on the options' order
    # (--arg and --arg-file: the first option's), so any of them arriving is enough
    given: dict[str, set[str]] = {}
    for i, token in enumerate(argv):
        if token == "--arg" and i + 1 < len(argv):
            item = argv[i + 1]
        elif token.startswith("--arg="):
            item = token.removeprefix("--arg=")
        elif token == "--arg-file" and i + 1 < len(argv):
            import yaml  # (a bentoml dependency)

            with open(argv[i + 1]) as f:
                for k, v in (yaml.safe_load(f) or {}).items():
                    given.setdefault(k, set()).add(str(v))
            continue
        else:
            continue
        key, _, value = item.partition("=")
        given.setdefault(key, set()).add(value)
    dropped = sorted(k for k, v in given.items() if k not in args or str(args[k]) not in v)
    if dropped:
        recorded = ", ".join(sorted(args)) or "none"
        env = ", ".join(ENV_PREFIX + k.upper() for k in dropped)
        raise ValueError(
            f"--arg {', '.join(dropped)} did not reach the service: serving a built bento, "
            f"BentoML passes it only the --arg values given to `bentoml build` ({recorded}); "
            f"set {env} instead"
        )


def _check_api_key(key: str, source: str) -> None:
    # NOTE: HTTP strips a header value's surrounding whitespace: no client could send this key
    if key != key.strip():
        raise ValueError(
            f"{source} starts or ends with whitespace (a secret file's trailing newline?), "
            "which no Authorization header can carry: remove it (the key is not shown)"
        )


def _convert(raw: Any, hint: Any, source: str) -> Any:
    kinds = (
        [a for a in typing.get_args(hint) if a is not type(None)]
        if isinstance(hint, types.UnionType)
        else [hint]
    )
    kind = kinds[0]
    if isinstance(raw, kind) and not (kind is int and isinstance(raw, bool)):
        return raw
    text = str(raw).strip()
    try:
        if kind is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError
        return kind(text)
    except ValueError:
        raise ValueError(f"{source} must be {kind.__name__}, got {raw!r}") from None
