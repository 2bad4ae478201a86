"""Engine configuration: flat EngineArgs at the edge, frozen per-component configs inside."""

import logging
import math
import os
import re
from dataclasses import dataclass, fields

import torch

from vllm_runner.engine.sampling_defaults import GENERATION_CONFIGS
from vllm_runner.model.layers.rotary import rope_max_positions
from vllm_runner.pooling_params import PoolerConfig

logger = logging.getLogger(__name__)
NVIDIA_DRIVER = "/proc/driver/nvidia/version"  # present when the kernel driver is loaded

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}
# "awq": a 4-bit AWQ checkpoint, which None also detects (model/layers/awq.py)
QUANTIZATIONS = (None, "awq", "compressed-tensors", "fp8", "gptq", "int4", "int8")
# vLLM's: "fcfs" serves requests in arrival order; "priority" by each request's priority
# (lower first), then arrival order
SCHEDULING_POLICIES = ("fcfs", "priority")
# "auto": the model's dtype; fp8 (e4m3, as vLLM's "fp8" / "fp8_e4m3", no scales): half the
# bytes per cached token, values rounded to 3 mantissa bits on the way in
KV_CACHE_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn}
# Piecewise graphs' largest step when serving on CUDA: on an H200 (1B shape, 256 sampled
# streams) the service served 6-16% more tokens with them for 0.5 s more start-up
# (loadtests/RESULTS.md). Offline batches run few small mixed steps: off there by default.
SERVING_PIECEWISE_MAX_TOKENS = 2048
_MAY_BE_NONE = ("async_scheduling", "enable_chunked_prefill")  # switches whose None: default
# integers whose None means something (a default, a random seed); the others must be set
_INT_MAY_BE_NONE = ("max_model_len", "max_num_batched_tokens", "seed", "num_kv_blocks",
                    "piecewise_max_tokens", "max_cpu_loras")  # fmt: skip


@dataclass(frozen=True)
class ModelConfig:
    path: str
    name: str
    hf_config: object  # transformers.PretrainedConfig
    dtype: torch.dtype
    device: torch.device
    max_model_len: int
    seed: int
    quantization: str | None
    enforce_eager: bool = False
    piecewise_max_tokens: int = 0  # EngineArgs'


@dataclass(frozen=True)
class CacheConfig:
    block_size: int
    enable_prefix_caching: bool
    gpu_memory_utilization: float
    num_kv_blocks: int | None  # fixed count (tests); None = size from memory
    cpu_kv_cache_gb: float
    cpu_offload_gb: float
    kv_cache_dtype: str = "auto"  # a KV_CACHE_DTYPES key

    def cache_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The dtype the KV cache stores."""
        return KV_CACHE_DTYPES[self.kv_cache_dtype] or model_dtype


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    # max_num_batched_tokens was not set: the runner may lower it to leave memory to the KV
    # cache (offloaded weights, see worker/memory.offload_step_budget).
    default_budget: bool = False
    # While requests decode, waiting ones join on every N-th step only (see Scheduler).
    admission_interval: int = 1
    scheduling_policy: str = "fcfs"  # a SCHEDULING_POLICIES name (see Scheduler)
    max_loras: int = 0  # distinct LoRA adapters a step may run (0: LoRA off)


@dataclass(frozen=True)
class LoRAConfig:
    max_loras: int  # adapters one step may run (device slots)
    max_lora_rank: int
    max_cpu_loras: int  # adapters kept loaded in CPU memory (LRU)


@dataclass
class EngineArgs:
    """Every engine setting, flat; ``create_configs`` validates and resolves them."""

    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    enable_prefix_caching: bool = True
    seed: int | None = 0  # None: a random one per engine (vLLM's seed=None)
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None
    cpu_kv_cache_gb: float = 1.0
    cpu_offload_gb: float = 0.0
    quantization: str | None = None
    kv_cache_dtype: str = "auto"
    enforce_eager: bool = False
    # Overlap step N + 1's scheduling with step N on the device; None = on for CUDA.
    async_scheduling: bool | None = None
    # While requests decode, admit waiting ones every N-th step: under steady arrivals the
    # steps between are pure decode and replay CUDA graphs (1: admit on every step).
    admission_interval: int = 1
    # "fcfs": requests are served in arrival order; "priority": by the priority each request
    # gives (lower first; ties in arrival order), and when KV blocks run out the running
    # request of the largest (priority, arrival) is preempted. A non-zero priority needs it.
    scheduling_policy: str = "fcfs"
    # Steps that prefill, up to this many tokens, run as piecewise CUDA graphs (layers
    # between attentions captured per token count, attention eager); 0: off. Llama family.
    # None: SERVING_PIECEWISE_MAX_TOKENS when serving where decode graphs are captured
    # (CUDA, not enforce_eager), else off.
    piecewise_max_tokens: int | None = None
    # "auto": the model's sampling defaults (generation_config.json) where a request sets
    # none, as vLLM; "vllm": SamplingParams' own defaults only; a folder: its
    # generation_config.json's
    generation_config: str = "auto"
    # How embedding requests pool the final hidden states (pooling_type "LAST" / "MEAN" /
    # "CLS", normalize): a PoolerConfig, a dict or its JSON text, as vLLM's; None: LAST,
    # L2-normalised (vLLM's default for decoder models)
    pooler_config: PoolerConfig | dict | str | None = None
    # Taken as vLLM scripts pass it; the engine never runs a repository's code either way
    # (a model type only that code defines is refused).
    trust_remote_code: bool = False
    # vLLM's, taken at the values this engine honours: it runs a model on one device, logs
    # no periodic stats, recomputes a preempted request (vLLM's CPU swap space: unused),
    # loads the model folder's tokenizer, and always chunks a prompt to the step budget.
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    disable_log_stats: bool = True
    swap_space: float = 4.0  # GiB
    tokenizer: str | None = None  # None or the model
    enable_chunked_prefill: bool | None = None  # None or True
    # Requests may run a LoRA adapter (``lora_request``), at most ``max_loras`` distinct ones
    # a step, of rank <= ``max_lora_rank``; ``max_cpu_loras`` (None: max_loras) stay loaded
    # in CPU memory. Off: the engine runs exactly as without LoRA (docs/lora.md).
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    def validate(self) -> None:
        def bad(name: str, limit: str) -> ValueError:
            return ValueError(f"{name} must be {limit}, got {getattr(self, name)!r}")

        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size",
                     "seed", "num_kv_blocks", "admission_interval",
                     "piecewise_max_tokens", "tensor_parallel_size",
                     "pipeline_parallel_size", "max_loras", "max_lora_rank",
                     "max_cpu_loras"):  # fmt: skip
            value = getattr(self, name)
            if value is None and name in _INT_MAY_BE_NONE:
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                raise bad(name, "an integer")
        for name in ("gpu_memory_utilization", "cpu_kv_cache_gb", "cpu_offload_gb", "swap_space"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise bad(name, "a number")
            if not math.isfinite(value):
                raise bad(name, "a finite number")
        for name in ("enable_prefix_caching", "enforce_eager", "async_scheduling",
                     "trust_remote_code", "disable_log_stats",
                     "enable_chunked_prefill", "enable_lora"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, bool) and not (name in _MAY_BE_NONE and value is None):
                raise bad(name, "true or false")
        named = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
        if isinstance(self.dtype, torch.dtype) and self.dtype in named:  # as vLLM takes it too
            self.dtype = named[self.dtype]
        if not isinstance(self.dtype, str) or (self.dtype != "auto" and self.dtype not in _DTYPES):
            raise bad("dtype", f"'auto' or one of {sorted(_DTYPES)}")
        if isinstance(self.device, torch.device):  # its name: "cpu", "cuda", "cuda:1"
            self.device = str(self.device)
        # NOTE: torch.device() takes no other spelling ("cuda:01", "cuda: 1" fail there)
        if not isinstance(self.device, str) or not re.fullmatch(
            r"auto|cpu|cuda(:(0|[1-9][0-9]*))?", self.device
        ):
            raise bad("device", "'auto', 'cpu' or 'cuda[:N]'")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:  # manual_seed's
            raise bad("seed", "an integer in [-2**63, 2**64)")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise bad("max_model_len", ">= 2")
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            if getattr(self, name) != 1:
                raise bad(name, "1 (this engine runs a model on one device)")
        if not self.disable_log_stats:
            raise bad("disable_log_stats", "True (this engine logs no periodic stats; "
                      "stats() returns its counters, AsyncLLM(log_stats=True) exports "
                      "Prometheus metrics)")  # fmt: skip
        if self.enable_chunked_prefill is False:
            raise bad("enable_chunked_prefill", "True (this engine always chunks a prompt to "
                      "the max_num_batched_tokens step budget)")  # fmt: skip
        if self.swap_space < 0:
            raise bad("swap_space", ">= 0")
        if self.tokenizer is not None and not (
            isinstance(self.tokenizer, str)
            and isinstance(self.model, str)
            and os.path.normpath(self.tokenizer) == os.path.normpath(self.model)
        ):
            raise bad("tokenizer", f"None or the model ({self.model!r}: this engine loads the "
                      "model folder's tokenizer)")  # fmt: skip
        if self.max_num_seqs < 1:
            raise bad("max_num_seqs", ">= 1")
        for name in ("max_loras", "max_lora_rank"):
            if getattr(self, name) < 1:
                raise bad(name, ">= 1")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise bad("max_cpu_loras", f"None or >= max_loras ({self.max_loras})")
        if self.admission_interval < 1:
            raise bad("admission_interval", ">= 1")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise bad("scheduling_policy", "'fcfs' or 'priority'")
        if self.piecewise_max_tokens is not None and self.piecewise_max_tokens < 0:
            raise bad("piecewise_max_tokens", ">= 0 (0 turns them off)")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise bad("max_num_batched_tokens", ">= 1")
        if self.block_size not in (8, 16, 32, 64, 128):
            raise bad("block_size", "one of 8, 16, 32, 64, 128")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise bad("gpu_memory_utilization", "in (0, 1]")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise bad("num_kv_blocks", ">= 1")
        if self.cpu_offload_gb < 0:
            raise bad("cpu_offload_gb", ">= 0")
        if self.cpu_kv_cache_gb <= 0:
            raise bad("cpu_kv_cache_gb", "> 0")
        if self.quantization not in QUANTIZATIONS:
            raise bad("quantization", f"one of {QUANTIZATIONS}")
        if self.quantization == "fp8" and self.device == "cpu":  # (other devices: at load)
            raise ValueError(
                "quantization='fp8' needs torch._scaled_mm on a CUDA GPU of compute capability "
                ">= 8.9, not device='cpu'; use quantization='int8' (weight-only, runs on any "
                "device) or quantization=None"
            )
        if not isinstance(self.kv_cache_dtype, str) or self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise bad("kv_cache_dtype", f"one of {tuple(KV_CACHE_DTYPES)}")
        if not isinstance(self.generation_config, str) or not (
            self.generation_config in GENERATION_CONFIGS or os.path.isdir(self.generation_config)
        ):
            raise bad(
                "generation_config",
                "'auto' (the model's sampling defaults), 'vllm' (the engine's own) or a "
                "folder holding a generation_config.json",
            )
        self.pooler_config = PoolerConfig.of(self.pooler_config)
        if self.generation_config not in GENERATION_CONFIGS:  # one spelling per folder
            self.generation_config = os.path.abspath(self.generation_config)

    def engine_apart_by_default(self) -> bool:
        """AsyncLLM's default placement: the engine core in a process of its own on CUDA."""
        return self.resolve_device().type == "cuda"

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            if torch.cuda.is_available():
                return torch.device("cuda")
            if os.path.exists(NVIDIA_DRIVER):  # a GPU host whose torch cannot use it
                logger.warning(
                    "device='auto': an NVIDIA driver is loaded but torch %s (CUDA %s) sees no "
                    "usable GPU (a driver older than this CUDA build?): running on the CPU; "
                    "pass device='cuda' to fail instead",
                    torch.__version__,
                    torch.version.cuda,
                )
            return torch.device("cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"device={self.device!r} was asked for, but torch {torch.__version__} (CUDA "
                f"{torch.version.cuda}) sees no usable CUDA GPU"
            )
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(
                f"device={self.device!r} was asked for, but torch sees "
                f"{torch.cuda.device_count()} CUDA GPU(s) (CUDA_VISIBLE_DEVICES numbers them "
                "from 0)"
            )
        return device

    def resolve_piecewise_max_tokens(self, device: torch.device, serving: bool) -> int:
        if self.piecewise_max_tokens is not None:
            return self.piecewise_max_tokens
        graphs = device.type == "cuda" and not self.enforce_eager
        return SERVING_PIECEWISE_MAX_TOKENS if serving and graphs else 0

    def resolve_dtype(self, hf_config: object, device: torch.device) -> torch.dtype:
        if self.dtype != "auto":
            return _DTYPES[self.dtype]
        if device.type == "cpu":
            return torch.float32
        config_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        if isinstance(config_dtype, str):
            config_dtype = _DTYPES.get(config_dtype)
        return config_dtype if config_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16

    def resolve_max_model_len(self, hf_config: object) -> int:
        model_max = rope_max_positions(hf_config)
        limit = f"max_position_embeddings={model_max}"
        if model_max != getattr(hf_config, "max_position_embeddings", model_max):
            limit = f"{model_max} positions (rope scaling: its original context x factor)"
        # A model class without sliding-window attention reads every earlier key, which
        # agrees with a window only up to its length.
        window = getattr(hf_config, "sliding_window", None)
        layer_types = getattr(hf_config, "layer_types", None)  # Qwen2: full below max_window_layers
        if layer_types is not None and "sliding_attention" not in layer_types:
            window = None
        if (
            window
            and getattr(hf_config, "use_sliding_window", True)
            and window < model_max
            and not _implements_sliding_window(hf_config)
        ):
            model_max, limit = window, f"sliding_window={window} (full attention only)"
        if self.max_model_len is None:
            return int(model_max)
        if self.max_model_len > model_max:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's {limit}")
        return self.max_model_len

    def scheduler_config(
        self, max_model_len: int, device: torch.device, serving: bool = False
    ) -> SchedulerConfig:
        budget = self.max_num_batched_tokens or default_step_budget(device, serving)
        return SchedulerConfig(
            self.max_num_seqs,
            budget,
            max_model_len,
            self.max_num_batched_tokens is None,
            self.admission_interval,
            self.scheduling_policy,
            self.max_loras if self.enable_lora else 0,
        )

    def lora_config(self) -> LoRAConfig | None:
        if not self.enable_lora:
            return None
        return LoRAConfig(self.max_loras, self.max_lora_rank, self.max_cpu_loras or self.max_loras)

    def cache_config(self) -> CacheConfig:
        return CacheConfig(
            block_size=self.block_size,
            enable_prefix_caching=self.enable_prefix_caching,
            gpu_memory_utilization=self.gpu_memory_utilization,
            num_kv_blocks=self.num_kv_blocks,
            cpu_kv_cache_gb=self.cpu_kv_cache_gb,
            cpu_offload_gb=self.cpu_offload_gb,
            kv_cache_dtype=self.kv_cache_dtype,
        )


def default_step_budget(device: torch.device, serving: bool) -> int:
    """Tokens per step when ``max_num_batched_tokens`` is unset, as vLLM picks them: GPUs
    of 70 GiB or more (not A100: larger steps measured slower there) take 16384 offline
    (fewer, fuller prefill steps: W1 8B on an H200 ran 3% faster than at 8192) and 8192 when
    serving, where a smaller step keeps the running streams' inter-token latency down;
    other devices 8192."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        if props.total_memory >= 70 * 2**30 and "a100" not in props.name.lower():
            return 8192 if serving else 16384
    return 8192


def _implements_sliding_window(hf_config: object) -> bool:
    """Whether the config's model class attends within sliding windows itself (Llama's
    family, Gemma); an unknown model is refused later, by the registry."""
    from vllm_runner.model.registry import resolve_model_class

    try:
        return getattr(resolve_model_class(hf_config), "implements_sliding_window", False)
    except ValueError:
        return False
