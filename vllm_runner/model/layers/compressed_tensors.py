"""compressed-tensors checkpoints (llm-compressor's W4A16, "pack-quantized"), loaded into
int4's layout (layers/int4.py).

The config.json ``quantization_config``: {"quant_method": "compressed-tensors", "format":
"pack-quantized", "config_groups": {name: {"targets": [...], "weights": {"num_bits": 4,
"type": "int", "strategy": "group" | "channel", "group_size": G, "symmetric": bool,
"actorder": ...}, "input_activations": null}}, "ignore": [...]}. Each quantized linear layer
stores, instead of ``weight`` [out, in]:
- ``weight_packed`` int32 [out, ceil(in / 8)]: nibble i (bits 4i..4i+3) of word j holds
  input 8j + i, as ``q + 8`` for the signed value q in -8..7;
- ``weight_scale`` [out, groups] (one group a row for "channel");
- ``weight_zero_point`` int32 [ceil(out / 8), groups] (asymmetric only): nibble i of word
  r holds output 8r + i's zero point z as ``z + 8``;
- ``weight_shape`` [2]: (out, in); ``weight_g_idx`` int32 [in] (``actorder: group``);
dequantized ``(q - z) * scale == (q + 8 - (z + 8)) * scale``: the stored nibbles are int4's
values and zero points (8 when symmetric), loaded exactly (``prequantized.int4_tensors``).

The quantized layers are those the config groups' ``targets`` name ("Linear": every linear
layer; "re:..." a regular expression; else a layer name) less those ``ignore`` names.
Other schemes (fp8, W8A8, W8A16, 2:4 sparse, ...) are refused, naming the scheme.
"""

import dataclasses
import re
from collections.abc import Iterator

import torch

from vllm_runner.model.layers.prequantized import (
    ROW_GROUP,
    PrequantizedInt4,
    Tensors,
    describe,
    int4_tensors,
    unpack_nibbles,
)

SYMMETRIC_ZERO = 8  # int4's zero point of a signed value's q + 8
# actorder values: those that store a g_idx (the others keep the groups in input order)
GROUP_ORDERS = ("group", True)
KEPT_ORDERS = (None, False, "weight", "static")
SUPPORTED = (
    "W4A16 'pack-quantized' (int 4-bit weights by group of a multiple of 16 or by channel, "
    "activations not quantized)"
)


@dataclasses.dataclass(frozen=True)
class CompressedConfig:
    """The parts of a compressed-tensors quantization_config this engine reads."""

    group_size: int  # or ROW_GROUP ("channel")
    symmetric: bool = True
    act_order: bool = False  # a g_idx per layer
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ()


def _scheme(fmt: object, weights: object, acts: object) -> str:
    """A config group's scheme for errors: W<bits>A<bits>, the format and the types."""

    def part(args: object, what: str) -> str:
        if not isinstance(args, dict):
            return f"{what} not quantized"
        return f"{what} {args.get('type')} {args.get('num_bits')}-bit {args.get('strategy')}"

    bits = [a.get("num_bits") if isinstance(a, dict) else 16 for a in (weights, acts)]
    return f"W{bits[0]}A{bits[1]} (format {fmt!r}, {part(weights, 'weights')}, " + (
        f"{part(acts, 'input activations')})"
    )


def _group_scheme(quant: dict, name: str, group: object) -> tuple:
    """One config group's weight scheme (group size, symmetric, act order), validated."""
    if not isinstance(group, dict):
        raise ValueError(f"compressed-tensors config group {name!r} is {group!r}, not a dict")
    fmt = group.get("format") or quant.get("format")
    weights, acts = group.get("weights"), group.get("input_activations")
    ok = fmt == "pack-quantized" and isinstance(weights, dict) and acts is None
    ok = ok and group.get("output_activations") is None
    ok = ok and weights.get("type") == "int" and weights.get("num_bits") == 4
    if not ok or weights.get("strategy") not in ("group", "channel"):
        raise ValueError(
            f"compressed-tensors scheme {_scheme(fmt, weights, acts)} of config group "
            f"{name!r} is not supported: this engine loads {SUPPORTED}"
        )
    size = ROW_GROUP
    if weights["strategy"] == "group":
        size = weights.get("group_size")
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % 16:
            raise ValueError(
                f"compressed-tensors group_size {size!r} (config group {name!r}) is not "
                "supported: it must be a positive multiple of 16 (the kernel's K tile)"
            )
    order = weights.get("actorder")
    if order not in GROUP_ORDERS + KEPT_ORDERS:
        raise ValueError(f"compressed-tensors actorder {order!r} (config group {name!r}) is "
                         f"not one of {list(GROUP_ORDERS + KEPT_ORDERS)}")  # fmt: skip
    symmetric = weights.get("symmetric", True)
    if not isinstance(symmetric, bool):
        raise ValueError(f"compressed-tensors symmetric {symmetric!r} must be true or false")
    return size, symmetric, order in GROUP_ORDERS


def compressed_config(quant: object) -> CompressedConfig:
    """Validate a compressed-tensors ``quantization_config``; errors name the value."""
    if not isinstance(quant, dict) or quant.get("quant_method") != "compressed-tensors":
        raise ValueError(
            "quantization='compressed-tensors' needs a compressed-tensors checkpoint (config."
            "json quantization_config with quant_method 'compressed-tensors'); this one has "
            f"{describe(quant)}"
        )
    groups = quant.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ValueError(
            f"compressed-tensors config_groups {groups!r} is not supported: this engine "
            f"loads {SUPPORTED}, declared in config_groups"
        )
    schemes = {name: _group_scheme(quant, name, group) for name, group in groups.items()}
    if len(set(schemes.values())) > 1:
        raise ValueError(
            f"compressed-tensors config groups {sorted(schemes)} quantize differently "
            f"({sorted(set(schemes.values()), key=str)}): this engine loads one W4A16 scheme "
            "for every quantized layer"
        )
    sparsity = quant.get("sparsity_config") or {}
    if sparsity.get("format") not in (None, "dense"):
        raise ValueError(
            f"compressed-tensors sparsity format {sparsity.get('format')!r} (sparse weights, "
            "e.g. 2:4) is not supported: this engine loads dense W4A16 checkpoints"
        )
    if quant.get("kv_cache_scheme") is not None:
        raise ValueError(
            f"compressed-tensors kv_cache_scheme {quant['kv_cache_scheme']!r} is not "
            "supported: this engine keeps its KV cache in the model dtype or kv_cache_dtype"
        )
    targets = tuple(t for g in groups.values() for t in g.get("targets") or ())
    ignore = tuple(quant.get("ignore") or ())
    if matches("lm_head", targets) and not matches("lm_head", ignore):
        raise ValueError(
            "compressed-tensors quantizes lm_head (targeted, not in ignore): this engine "
            "keeps the LM head in the model's dtype"
        )
    size, symmetric, act_order = next(iter(schemes.values()))
    return CompressedConfig(size, symmetric, act_order, targets, ignore)


def matches(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether a layer ``name`` is one of compressed-tensors' ``targets`` / ``ignore``:
    "Linear" (every linear layer), "re:<regex>" (matched from the start), or a name."""
    for pattern in patterns:
        if pattern == "Linear" or name == pattern or name.endswith(f".{pattern}"):
            return True
        if pattern.startswith("re:") and re.match(pattern[3:], name):
            return True
    return False


class CompressedInt4(PrequantizedInt4):
    """compressed-tensors W4A16 checkpoints: int4's layout and kernel, the quantized tensors
    loaded, not computed; with ``actorder: group`` each layer gathers its inputs in group
    order first."""

    name = "compressed-tensors"

    def __init__(self, config: CompressedConfig) -> None:
        super().__init__(config.group_size, reorders_inputs=config.act_order)
        self.config = config

    def quantized(self, name: str) -> bool:
        return matches(name, self.config.targets) and not matches(name, self.config.ignore)

    def checkpoint_tensors(
        self, weights: Iterator[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        required = {"weight_packed", "weight_scale", "weight_shape"}
        required |= set() if self.config.symmetric else {"weight_zero_point"}
        return self.by_layer(weights, required, "weight_g_idx", self.config.group_size)

    def _convert(self, prefix: str, parts: dict[str, torch.Tensor]) -> Tensors:
        n, k = (int(v) for v in parts["weight_shape"].tolist())
        q = unpack_nibbles(parts["weight_packed"], 1)  # [out, 8 * ceil(in / 8)]
        if q.shape != (n, -(-k // 8) * 8):
            raise ValueError(
                f"has weight_packed of shape {tuple(parts['weight_packed'].shape)} for "
                f"weight_shape {[n, k]}"
            )
        scale = parts["weight_scale"]
        if self.config.symmetric:
            zero = torch.full(scale.shape, SYMMETRIC_ZERO, dtype=torch.uint8)
        else:
            zero = unpack_nibbles(parts["weight_zero_point"], 0)[:n]
        return int4_tensors(prefix, q[:, :k], zero, scale, self.config.group_size,
                            parts.get("weight_g_idx"), self)  # fmt: skip
