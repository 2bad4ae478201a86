"""PEFT adapter folders: ``adapter_config.json`` and ``adapter_model.safetensors`` read,
checked against the model, and loaded as (A, scale * B) per target module.

A check needs only ``LoRALimits`` (small, picklable: a front end apart from the engine
process checks requests itself) and reads the config and the tensors' shapes, not their data.
"""

import json
import math
import os
import re
from dataclasses import dataclass

import torch

from vllm_runner.lora.request import LoRARequest

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# The adapter's own prefix (PeftModel.base_model.model: the HF model) and an adapter name
# some savers leave in (".default").
_KEY = re.compile(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight")
_NOT_SERVED = ("lm_head", "embed_tokens")  # LoRA on the vocabulary layers: not served


@dataclass(frozen=True)
class LoRALimits:
    """What checking an adapter needs from a built engine."""

    max_lora_rank: int
    # HF module path (e.g. "model.layers.0.self_attn.q_proj") -> (in_features, out_features)
    modules: dict[str, tuple[int, int]]


@dataclass(frozen=True)
class AdapterModule:
    """One target module's weights: ``y += (x @ a.T) @ b.T``."""

    a: torch.Tensor  # [rank, in_features]
    b: torch.Tensor  # [out_features, rank], the adapter's scale folded in


class AdapterChecks:
    """A front end's checks of requests' adapters (``InputProcessor.loras``): each adapter's
    folder is read once (the engine loads it when its first request is added)."""

    def __init__(self, limits: LoRALimits | None) -> None:
        self.limits = limits
        self._checked: set[LoRARequest] = set()

    def check(self, lora: object) -> None:
        """An adapter this engine can run, or a ValueError naming why not."""
        if not isinstance(lora, LoRARequest):
            raise ValueError(f"lora_request must be a LoRARequest, got {type(lora).__name__}")
        if self.limits is None:
            raise ValueError(f"lora_request {lora.lora_name!r} needs an engine started with "
                             "enable_lora=True")  # fmt: skip
        if lora not in self._checked:
            check_adapter(lora, self.limits)
            if len(self._checked) >= 256:
                self._checked.clear()
            self._checked.add(lora)


def check_adapter(lora: LoRARequest, limits: LoRALimits) -> dict[str, tuple[int, int, int]]:
    """Each target module's (rank, in, out), once the adapter passed every check; else a
    ValueError naming the value and the limit."""
    config = read_config(lora)
    shapes = _tensor_shapes(lora)
    return _check_modules(lora, config, shapes, limits)


def load_adapter(
    lora: LoRARequest, limits: LoRALimits, dtype: torch.dtype
) -> dict[str, AdapterModule]:
    """The adapter's weights on the CPU in ``dtype``, checked as ``check_adapter`` does."""
    config = read_config(lora)
    tensors = _read_tensors(lora)
    modules = _check_modules(lora, config, {k: tuple(t.shape) for k, t in tensors.items()}, limits)
    by_module = {_KEY.fullmatch(k).group(1, 2): t for k, t in tensors.items()}
    out = {}
    for module, (rank, _, _) in modules.items():
        alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
        # NOTE: rsLoRA scales by alpha / sqrt(r), plain LoRA by alpha / r (PEFT's rule)
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        a, b = by_module[module, "A"], by_module[module, "B"]
        out[module] = AdapterModule(a.to(dtype), (b.float() * scale).to(dtype))
    return out


def read_config(lora: LoRARequest) -> dict:
    """The folder's adapter_config.json, refused where it asks for what is not served."""
    name, path = lora.lora_name, lora.lora_path
    if not os.path.isdir(path):
        raise ValueError(f"LoRA adapter {name!r}: lora_path {path!r} is not a folder (a PEFT "
                         f"adapter's: {CONFIG} and {WEIGHTS[0]})")  # fmt: skip
    try:
        with open(os.path.join(path, CONFIG)) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"LoRA adapter {name!r}: cannot read {CONFIG} in {path!r}: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"LoRA adapter {name!r}: {CONFIG} must hold a JSON object")
    if config.get("use_dora"):
        raise ValueError(f"LoRA adapter {name!r} is a DoRA adapter (use_dora: true): DoRA is "
                         "not supported, only plain LoRA / rsLoRA")  # fmt: skip
    if config.get("modules_to_save"):
        raise ValueError(
            f"LoRA adapter {name!r} trains whole modules (modules_to_save: "
            f"{config['modules_to_save']!r}): not supported, only LoRA on the linear layers"
        )
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise ValueError(f"LoRA adapter {name!r} trains biases (bias: {config.get('bias')!r}, "
                         "lora_bias): not supported, only bias 'none'")  # fmt: skip
    targets = config.get("target_modules")
    if isinstance(targets, list):
        for target in targets:
            if str(target).rsplit(".", 1)[-1] in _NOT_SERVED:
                raise _vocabulary_layer(name, target)
    return config


def _tensor_shapes(lora: LoRARequest) -> dict[str, tuple[int, ...]]:
    file = _weights_file(lora)
    if file.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(file, "pt") as f:  # the header only
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    return {k: tuple(t.shape) for k, t in _read_tensors(lora).items()}


def _read_tensors(lora: LoRARequest) -> dict[str, torch.Tensor]:
    file = _weights_file(lora)
    if file.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(file)
    return torch.load(file, map_location="cpu", weights_only=True)


def _weights_file(lora: LoRARequest) -> str:
    for file in WEIGHTS:
        if os.path.isfile(full := os.path.join(lora.lora_path, file)):
            return full
    raise ValueError(f"LoRA adapter {lora.lora_name!r}: {lora.lora_path!r} holds no "
                     f"{' or '.join(WEIGHTS)}")  # fmt: skip


def _check_modules(
    lora: LoRARequest, config: dict, shapes: dict[str, tuple[int, ...]], limits: LoRALimits
) -> dict[str, tuple[int, int, int]]:
    name, known = lora.lora_name, limits.modules
    targets = config.get("target_modules")
    if isinstance(targets, list):  # (a regex string: its modules are checked by the keys)
        names = {m.rsplit(".", 1)[-1] for m in known}
        for target in targets:
            if not any(m == target or m.endswith(f".{target}") for m in known):
                raise ValueError(
                    f"LoRA adapter {name!r} targets module {target!r}, which this model does "
                    f"not have (LoRA-capable: {sorted(names)})"
                )
    max_rank = limits.max_lora_rank
    rank = config.get("r")
    if isinstance(rank, int) and rank > max_rank:
        raise _rank_error(name, rank, max_rank)
    parts: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        match = _KEY.fullmatch(key)
        if match is None:
            leaf = "embedding" if "lora_embedding" in key else key
            if any(s in key for s in _NOT_SERVED) or leaf == "embedding":
                raise _vocabulary_layer(name, key)
            raise ValueError(f"LoRA adapter {name!r} holds {key!r}, which is no lora_A / lora_B "
                             "weight of a linear layer: not supported")  # fmt: skip
        module, part = match.groups()
        if module.rsplit(".", 1)[-1] in _NOT_SERVED:
            raise _vocabulary_layer(name, module)
        if module not in known:
            raise ValueError(f"LoRA adapter {name!r} has weights for {module!r}, which this "
                             "model does not have (or cannot take LoRA on)")  # fmt: skip
        parts.setdefault(module, {})[part] = shape
    if not parts:
        raise ValueError(f"LoRA adapter {name!r} holds no lora_A / lora_B weights")
    modules = {}
    for module, ab in sorted(parts.items()):
        size_in, size_out = known[module]
        a, b = ab.get("A"), ab.get("B")
        if a is None or b is None or len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise ValueError(f"LoRA adapter {name!r}: {module} needs lora_A [r, in] and lora_B "
                             f"[out, r], got {a} and {b}")  # fmt: skip
        if a[1] != size_in or b[0] != size_out:
            raise ValueError(
                f"LoRA adapter {name!r}: {module} has lora_A {list(a)} and lora_B {list(b)}, "
                f"but the model's layer is [{size_out}, {size_in}] (an adapter of another model?)"
            )
        if a[0] > max_rank:
            raise _rank_error(name, a[0], max_rank, module)
        modules[module] = (a[0], size_in, size_out)
    return modules


def _pattern_value(patterns: dict | None, module: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern: the first key that matches the module's path's
    end (a regex), else ``default``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def _rank_error(name: str, rank: int, max_rank: int, module: str | None = None) -> ValueError:
    where = f" ({module})" if module else ""
    return ValueError(f"LoRA adapter {name!r} has rank {rank}{where}, more than max_lora_rank "
                      f"{max_rank}: start the engine with max_lora_rank >= {rank}")  # fmt: skip


def _vocabulary_layer(name: str, what: str) -> ValueError:
    return ValueError(f"LoRA adapter {name!r} targets {what!r}: LoRA on the embedding or "
                      "lm_head layers is not supported, only on linear layers")  # fmt: skip
