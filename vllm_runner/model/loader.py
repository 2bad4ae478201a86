"""Resolve a model name to a local folder, build our module, load HF weights by name."""

import glob
import json
import logging
import os
from collections.abc import Iterator

import torch
from torch import nn

from vllm_runner.model.layers import cpu_gemm
from vllm_runner.model.layers.parallel import load_shard
from vllm_runner.model.registry import resolve_model_class

logger = logging.getLogger(__name__)


def resolve_model_path(model: str | None) -> str:
    """None -> the default model; a local folder; or a hub id found in the local HF cache
    (never downloads)."""
    if model is None:
        from vllm_runner.model.default_model import default_model_path

        return default_model_path()
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise ValueError(f"model folder {model!r} has no config.json")
        # (absolute: a shared engine's front ends load its tokenizer from this path, from
        # their own working directories)
        return os.path.abspath(model)
    if os.path.exists(model) or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ValueError(
            f"model {model!r} is not a local model folder (config.json + weights) "
            "nor a hub id ('org/name') in the local Hugging Face cache"
        )
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model, local_files_only=True)
    except Exception as e:
        raise ValueError(
            f"model {model!r} is not in the local Hugging Face cache and downloads are off: "
            f"pass a local folder instead ({type(e).__name__})"
        ) from None


def iterate_weights(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    for file in checkpoint_files(path):
        if file.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(file, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield name, f.get_tensor(name)
        else:
            yield from torch.load(file, map_location="cpu", weights_only=True).items()


def checkpoint_files(path: str) -> list[str]:
    """The checkpoint's files, as transformers picks them: ``model.safetensors`` or the
    shards its index names, else ``pytorch_model.bin`` or its index's shards; a folder may
    hold other files in another naming (Mistral's ``consolidated.safetensors``, an
    ``adapter_model.safetensors``). Without either name: all *.safetensors, else all
    pytorch_model*.bin (shards saved without an index)."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        # NOTE: the single file before the index, as transformers (an index may be left
        # behind by shards merged into one file)
        if os.path.isfile(os.path.join(path, name)):
            return [os.path.join(path, name)]
        index = os.path.join(path, f"{name}.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                named = sorted(set(json.load(f)["weight_map"].values()))
            files = [os.path.join(path, file) for file in named]
            absent = [file for file in named if not os.path.isfile(os.path.join(path, file))]
            if absent:
                raise ValueError(f"{index} names {absent[:3]}, not in the folder")
            return files
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    files = files or sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
    if not files:
        raise ValueError(f"model folder {path!r} has no *.safetensors or pytorch_model*.bin")
    return files


def load_weights(model: nn.Module, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Copy checkpoint tensors into our (possibly fused, sharded) parameters by HF name."""
    params = dict(model.named_parameters())
    try:
        loaded = _copy_weights(model, params, weights)
    finally:  # load-time only: a layer's bound loader on its own parameter is a reference
        for param in params.values():  # cycle that would keep the weights on the device
            param.__dict__.pop("weight_loader", None)  # after `del llm`, until a gc pass
    missing = _missing(model, params, loaded)
    if missing == ["lm_head.weight"]:
        # NOTE: an embedding model's checkpoint (Qwen3-Embedding-8B: untied, no head) is
        # loaded for pooling: the head stays zero, and the engine refuses generation.
        logger.warning("the checkpoint has no lm_head.weight: the model serves embeddings only")
        model.lm_head.weight.data.zero_()
        model.pooling_only = True
    elif missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")


def _missing(
    model: nn.Module, params: dict[str, nn.Parameter], loaded: set[tuple[str, object]]
) -> list[str]:
    """The checkpoint names of the parameters, and of the parts of fused ones (a k_proj of
    a qkv_proj; an expert's projection of stacked experts: ``w13['up', 3]``), that no
    checkpoint tensor loaded."""
    packed = getattr(model, "packed_modules_mapping", {})
    missing = []
    for name in params:
        prefix, _, leaf = name.rpartition(".")
        shards = getattr(model.get_submodule(prefix), "checkpoint_shards", None)
        if shards is not None:  # stacked experts: whole, or one tensor per expert and part
            if (name, None) not in loaded:
                missing += [f"{name}{list(s)}" for s in shards(leaf) if (name, s) not in loaded]
            continue
        parts = [(src, dst, sid) for src, (dst, sid) in packed.items() if f".{dst}." in name]
        for src, dst, sid in parts or [(None, None, None)]:
            if (name, sid) not in loaded:
                missing.append(name if src is None else name.replace(f".{dst}.", f".{src}."))
    return sorted(missing)


def _copy_weights(
    model: nn.Module, params: dict[str, nn.Parameter], weights: Iterator[tuple[str, torch.Tensor]]
) -> set[tuple[str, object]]:
    """The (parameter name, shard id) pairs loaded: a fused parameter loads by parts."""
    buffers = dict(model.named_buffers())
    packed = getattr(model, "packed_modules_mapping", {})
    head = getattr(model, "lm_head", None)  # tied: its weight is the embedding's parameter
    tied = next((n for n, p in params.items() if head is not None and p is head.weight), None)
    remap = getattr(model, "remap_checkpoint_name", None)  # (layers/moe.py)
    loaded: set[tuple[str, object]] = set()
    for name, tensor in weights:
        stored = name  # the checkpoint's own name, for errors
        if ".rotary_emb." in name:  # inv_freq, cos_cached, sin_cached: derived here
            continue
        if name == "lm_head.weight" and tied not in (None, name):
            if (tied, None) in loaded:
                continue
            name = tied  # a tied checkpoint may store the head, not the embedding (which, if
            # it comes later, holds the same values)
        shard_id = None
        experts = remap(name) if remap is not None else None  # an MoE block's tensor
        if experts is not None:
            name, shard_id = experts
        for src, (dst, sid) in packed.items() if experts is None else ():
            if f".{src}." in name:
                name, shard_id = name.replace(f".{src}.", f".{dst}."), sid
                break
        if name not in params and f"model.{name}" in params:
            # old OPT checkpoints and embedding models saved as the bare decoder
            # (Qwen3-Embedding's "layers.0...", "norm.weight") lack the "model." prefix
            name = f"model.{name}"
        if name not in params:
            if name in buffers:
                continue  # a derived buffer
            raise ValueError(
                f"checkpoint tensor {stored!r} matches no parameter of {type(model).__name__}"
            )
        param = params[name]
        loader = getattr(param, "weight_loader", None)
        try:
            if loader is None:
                load_shard(param.data, tensor)
            else:
                loader(param, tensor.to(param.dtype), shard_id)
        except ValueError as e:  # a shape mismatch: name the checkpoint's tensor
            raise ValueError(f"checkpoint tensor {stored!r} {e}") from None
        loaded.add((name, shard_id))
    return loaded


def build_model(
    path: str,
    hf_config: object,
    dtype: torch.dtype,
    device: torch.device,
    *,
    quantization: str | None = None,
    cpu_offload_gb: float = 0.0,
    gpu_memory_utilization: float = 1.0,
    max_model_len: int | None = None,
) -> nn.Module:
    """Build and load the model on ``device``. With quantization or offloading the weights
    are staged on the CPU, then quantized and placed layer by layer (worker/offload.py); the
    offloader, if any, is ``model.weight_offloader``. On CUDA, weights that cannot fit under
    ``gpu_memory_utilization`` fail here, before anything is loaded. ``max_model_len``: the
    positions the engine serves (LongRoPE picks its factors by it; None: all the model's)."""
    from vllm_runner.model.layers.quant import get_quant_method
    from vllm_runner.worker.offload import check_weights_fit, place_weights, plan_weights

    _refuse_expert_options(resolve_model_class(hf_config), quantization, cpu_offload_gb)
    method = get_quant_method(quantization, device, hf_config)
    prequantized = method is not None and method.prequantized  # layers/prequantized.py
    meta_model = _instantiate(hf_config, dtype, torch.device("meta"), max_model_len)
    if prequantized:
        method.prepare(meta_model)
    plan = plan_weights(meta_model, method, cpu_offload_gb)
    if device.type == "cuda":
        check_weights_fit(plan, device, gpu_memory_utilization)
    staged = method is not None or bool(plan.offload_layers)
    model = _instantiate(hf_config, dtype, torch.device("cpu") if staged else device, max_model_len)
    weights = iterate_weights(path)
    if prequantized:
        method.prepare(model)
        weights = method.checkpoint_tensors(weights)
    try:
        load_weights(model, weights)
    except ValueError as e:
        if not prequantized:
            _refuse_prequantized(hf_config, e)
        raise
    if staged:
        model.weight_offloader = place_weights(model, device, method, plan)
    if device.type == "cpu" and not plan.offload_layers:  # offloaded layers swap weights in
        cpu_gemm.pack_model(model)
    return model.eval()


def _refuse_expert_options(
    model_cls: type[nn.Module], quantization: str | None, cpu_offload_gb: float
) -> None:
    """Quantization and offloading cover linear layers only: a mixture of experts' stacked
    expert weights (most of its bytes) would stay as they are, so refuse them by name."""
    if not getattr(model_cls, "has_experts", False):
        return
    name = model_cls.__name__
    if quantization is not None:
        raise ValueError(
            f"quantization={quantization!r} is not supported for {name} (a mixture of "
            "experts: the quantized layers here are linear layers, not stacked experts); "
            "use quantization=None"
        )
    if cpu_offload_gb > 0:
        raise ValueError(
            f"cpu_offload_gb={cpu_offload_gb} is not supported for {name} (a mixture of "
            "experts: offloading streams linear layers, not stacked experts); use "
            "cpu_offload_gb=0"
        )


def _refuse_prequantized(hf_config: object, error: ValueError) -> None:
    """A checkpoint stored quantized (FP8, ...: its config names a quant_method) fails
    to load on its packed tensors or scales; say why instead of naming one of them."""
    quant = getattr(hf_config, "quantization_config", None)  # a dict, as config.json holds it
    if not isinstance(quant, dict):
        return
    raise ValueError(
        f"{error}: the checkpoint is pre-quantized (quantization_config quant_method "
        f"{quant.get('quant_method')!r}), which this engine does not load (of pre-quantized "
        "checkpoints it loads 4-bit AWQ, GPTQ and compressed-tensors W4A16); load the "
        "unquantized checkpoint (quantization='int8', 'int4' or 'fp8' quantizes it at load)"
    ) from None


def _instantiate(
    hf_config: object, dtype: torch.dtype, device: torch.device, max_model_len: int | None = None
) -> nn.Module:
    model_cls = resolve_model_class(hf_config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return model_cls(hf_config, max_model_len)
    finally:
        torch.set_default_dtype(previous)
