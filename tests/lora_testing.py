"""PEFT adapter folders written by hand (peft is not installed): adapter_config.json and
adapter_model.safetensors with PEFT's key names, and the base model with an adapter merged
into its weights (W + scale * B @ A), for parity tests of the LoRA engine."""

import json
import math
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

LLAMA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PARENT = {"gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}  # (the rest: self_attn)


def module_path(layer: int, module: str) -> str:
    return f"model.layers.{layer}.{_PARENT.get(module, 'self_attn')}.{module}"


def write_adapter(
    path: str,
    model_dir: str,
    rank: int = 4,
    alpha: float = 8.0,
    modules: tuple[str, ...] = LLAMA_MODULES,
    seed: int = 1,
    std: float = 0.3,
    **config,
) -> str:
    """A random LoRA adapter of the Llama at ``model_dir`` (every layer, ``modules``);
    ``config``: more adapter_config.json fields (use_rslora, target_modules, ...)."""
    weights = load_file(os.path.join(model_dir, "model.safetensors"))
    with open(os.path.join(model_dir, "config.json")) as f:
        num_layers = json.load(f)["num_hidden_layers"]
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(num_layers):
        for module in modules:
            out_f, in_f = weights[f"{module_path(layer, module)}.weight"].shape
            key = f"base_model.model.{module_path(layer, module)}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) * std
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * std
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    settings = {
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(modules),
        "bias": "none", "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "fan_in_fan_out": False, **config,
    }  # fmt: skip
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(settings, f)
    return path


def merge_adapter(model_dir: str, adapter_dir: str, out_dir: str) -> str:
    """A copy of the model folder with the adapter merged: W + scale * B @ A (PEFT's rule:
    scale alpha / r, or alpha / sqrt(r) with use_rslora)."""
    shutil.copytree(model_dir, out_dir, dirs_exist_ok=True)
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        config = json.load(f)
    weights = load_file(os.path.join(model_dir, "model.safetensors"))
    lora = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    for key, a in lora.items():
        if ".lora_A." not in key:
            continue
        b = lora[key.replace(".lora_A.", ".lora_B.")].double()
        rank = a.shape[0]
        alpha = config["lora_alpha"]
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        weights[name] = (weights[name].double() + scale * b @ a.double()).float()
    save_file(weights, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    return out_dir
