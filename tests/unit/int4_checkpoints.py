"""4-bit checkpoints written by hand for the GPTQ and compressed-tensors tests: known integer
weights, zero points and scales (``Int4Layer``), packed here by each format's published rule,
next to a float checkpoint of the same weights dequantized, ``(q - zero) * scale``."""

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vllm_runner import SamplingParams

KW = dict(dtype="float32", device="cpu", num_kv_blocks=64)
PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=3)
PROMPTS = [[(13 * i + 7 * j) % 384 for j in range(5 + 9 * i)] for i in range(4)]
LAYERS = 4 * 2  # qkv, o, gate_up, down in each of src's 2 decoder layers
MERGED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
SHARED_INPUT = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # merged: one input


def pack_nibbles(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Integers 0..15 -> int32 words along ``dim``: element 8j + i in bits 4i..4i+3 of word
    j (zeros pad the last word), the rule GPTQ and compressed-tensors both pack by."""
    v = values.long().movedim(dim, -1)
    v = F.pad(v, (0, -v.shape[-1] % 8)).unflatten(-1, (-1, 8))
    words = (v << (4 * torch.arange(8))).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(-1, dim).contiguous()


@dataclasses.dataclass
class Int4Layer:
    """One layer's intended values: ``w[n, k] = (q[n, k] - zero[n, g]) * scale[n, g]`` for
    the group ``g = g_idx[k]``."""

    q: torch.Tensor  # [N, K] 0..15
    zero: torch.Tensor  # [N, groups]
    scale: torch.Tensor  # [N, groups], in the checkpoint's dtype
    g_idx: torch.Tensor  # [K] int32

    @property
    def weight(self) -> torch.Tensor:  # [N, K] fp32, exact (a 5-bit integer times a scale)
        g = self.g_idx.long()
        return (self.q - self.zero[:, g]).float() * self.scale.float()[:, g]


def int4_layer(
    n: int,
    k: int,
    group_size: int,  # -1: one group a row
    gen: torch.Generator,
    *,
    zeros: tuple[int, int] | None,  # the zero points' range (inclusive); None: 8 (symmetric)
    g_idx: torch.Tensor | None = None,  # act order: a permutation of the plain groups
    scale_dtype: torch.dtype = torch.float16,
) -> Int4Layer:
    g = k if group_size == -1 else group_size
    groups = -(-k // g)
    q = torch.randint(0, 16, (n, k), generator=gen)
    if zeros is None:
        zero = torch.full((n, groups), 8)
    else:
        zero = torch.randint(zeros[0], zeros[1] + 1, (n, groups), generator=gen)
    scale = (0.005 + 0.025 * torch.rand(n, groups, generator=gen)).to(scale_dtype)
    plain = (torch.arange(k) // g).int()
    return Int4Layer(q, zero, scale, plain if g_idx is None else g_idx)


def act_order(k: int, group_size: int, gen: torch.Generator) -> torch.Tensor:
    """A g_idx as GPTQ's act order writes it: the plain groups over a permutation of the
    inputs (each group keeps group_size inputs, none consecutive in general)."""
    g = k if group_size == -1 else group_size
    return (torch.arange(k) // g).int()[torch.randperm(k, generator=gen)]


def save_int4(
    src: str,
    folder: Path,
    quant: dict,
    make: Callable[[str, int, int], Int4Layer | None],
    write: Callable[[str, Int4Layer], dict[str, torch.Tensor]],
) -> tuple[str, str, dict[str, Int4Layer]]:
    """``src`` with each decoder linear layer that ``make(name, N, K)`` gives values for
    stored as ``write(name, values)`` writes it, config.json's quantization_config
    ``quant``; returns (that folder, a float folder of the same weights dequantized, the
    values by HF layer name)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(f"{src}/model.safetensors")
    quantized, dequantized, layers = {}, dict(tensors), {}
    for name, t in tensors.items():
        layer = name.removesuffix(".weight")
        values = None
        if t.dim() == 2 and ".layers." in name and name.endswith("_proj.weight"):
            values = make(layer, *t.shape)
        if values is None:
            quantized[name] = t
            continue
        quantized.update(write(layer, values))
        dequantized[name] = values.weight
        layers[layer] = values
    paths = []
    for sub, data in (("quantized", quantized), ("dequantized", dequantized)):
        shutil.copytree(src, folder / sub)
        save_file(data, folder / sub / "model.safetensors", metadata={"format": "pt"})
        paths.append(str(folder / sub))
    config = json.loads((folder / "quantized" / "config.json").read_text())
    config["quantization_config"] = quant
    (folder / "quantized" / "config.json").write_text(json.dumps(config))
    return paths[0], paths[1], layers


def shared_input_key(layer: str) -> str:
    """Layers that the engine merges read one input and share its act order: q/k/v and
    gate/up key by their parent module, the others by their own name."""
    parent, _, leaf = layer.rpartition(".")
    return parent if leaf in SHARED_INPUT else layer


def check_loaded_weights(model: torch.nn.Module, layers: dict[str, Int4Layer]) -> tuple[int, int]:
    """Every int4 layer of ``model`` dequantizes to its checkpoint layers' intended weights
    (merged q/k/v and gate/up concatenated), bit for bit, in its own input order; returns
    how many layers were checked and how many permute their inputs."""
    from kernels import reference

    checked = permuted = 0
    for name, layer in model.named_modules():
        if getattr(layer, "quant_method", None) is None:
            continue
        prefix, _, leaf = name.rpartition(".")
        want = torch.cat([layers[f"{prefix}.{p}"].weight for p in MERGED.get(leaf, (leaf,))])
        if layer.permutes_inputs:
            want = want[:, layer.input_perm.long()]
            permuted += 1
        group_size = layer.quant_method.group_size
        got = reference.int4_dequantize(layer.weight, layer.weight_scale, layer.weight_zero,
                                        group_size, layer.in_features)  # fmt: skip
        assert torch.equal(got, want), name
        checked += 1
    return checked, permuted


def save_src(folder: Path, peaked_llama: Callable) -> str:
    """The tests' tiny Llama (``peaked_llama``, conftest.py) with inputs of 128 (hidden) and
    320 (down_proj: in groups of 128, a short last group)."""
    return peaked_llama(str(folder), ("embed",), vocab_size=384,
                        hidden_size=128, intermediate_size=320, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=512)  # fmt: skip


def assert_same_outputs(got: list, want: list) -> None:
    """Greedy tokens equal; logprobs equal up to fp32 summation order."""
    for a, b in zip(got, want, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            assert list(x) == list(y)
            assert list(x.values()) == pytest.approx(list(y.values()), abs=1e-4)
