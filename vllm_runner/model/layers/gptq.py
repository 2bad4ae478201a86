"""GPTQ checkpoints (AutoGPTQ / GPTQModel, 4-bit), loaded into int4's layout (layers/int4.py).

A GPTQ checkpoint's config.json carries ``quantization_config`` {"quant_method": "gptq",
"bits": 4, "group_size": G (-1: one group per row), "desc_act": bool, "sym": bool,
"checkpoint_format": "gptq" | "gptq_v2"}; each quantized linear layer stores, instead of
``weight`` [out, in]:
- ``qweight`` int32 [in / 8, out]: nibble i (bits 4i..4i+3) of row r holds input 8r + i;
- ``qzeros`` int32 [groups, out / 8]: nibble i of column c holds output 8c + i's zero point;
- ``scales`` fp16 [groups, out];
- ``g_idx`` int32 [in] (optional without desc_act): each input's group;
dequantized ``(q - zero) * scale`` with the input's group's zero and scale, int4's
convention. The "gptq" format (AutoGPTQ, GPTQModel's v1) stores ``zero - 1``: every kernel
reading it adds the 1 back, so a stored nibble z means a zero point of z + 1 (1..16, which
int4's uint8 zero points hold); "gptq_v2" stores the zero point itself. ``sym`` changes only
the zero points' values (8), not the format.

At load a layer's tensors become int4's (``prequantized.int4_tensors``), exactly; with
``desc_act`` its inputs are sorted by group first (``prequantized.py``'s act order). 2-, 3-
and 8-bit GPTQ, other packings and per-module overrides are refused, naming the value.
"""

import dataclasses
import json
import os
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

# AutoGPTQ's own file: checkpoints saved before (or besides) config.json's quantization_config
QUANTIZE_CONFIG = "quantize_config.json"
# checkpoint_format -> what a stored zero point nibble is short of the zero point
ZERO_OFFSETS = {"gptq": 1, "gptq_v2": 0}


@dataclasses.dataclass(frozen=True)
class GptqConfig:
    """The parts of a GPTQ quantization_config this engine reads."""

    group_size: int  # or ROW_GROUP
    desc_act: bool = False
    zero_offset: int = 1  # ZERO_OFFSETS of the checkpoint_format
    # modules_in_block_to_quantize, flattened (name suffixes); empty: every linear layer
    modules: tuple[str, ...] = ()


def quantize_config_json(path: str) -> dict | None:
    """The quantization_config of a GPTQ checkpoint whose config.json has none, from its
    ``quantize_config.json`` (which names no quant_method); None without one."""
    file = os.path.join(path, QUANTIZE_CONFIG)
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        return {"quant_method": "gptq", **json.load(f)}


def gptq_config(quant: object) -> GptqConfig:
    """Validate a GPTQ ``quantization_config`` (config.json's dict); errors name the value."""
    if not isinstance(quant, dict) or quant.get("quant_method") != "gptq":
        raise ValueError(
            "quantization='gptq' needs a GPTQ checkpoint (config.json quantization_config with "
            f"quant_method 'gptq'); this one has {describe(quant)}"
        )
    bits = quant.get("bits")
    if bits != 4 or isinstance(bits, bool):
        raise ValueError(
            f"GPTQ bits {bits!r} is not supported: this engine loads 4-bit GPTQ only (int4's "
            "layout; 2-, 3- and 8-bit weights pack differently and have no kernel here)"
        )
    group = quant.get("group_size")
    grouped = isinstance(group, int) and not isinstance(group, bool) and group > 0
    if group != ROW_GROUP and not (grouped and group % 16 == 0):
        raise ValueError(
            f"GPTQ group_size {group!r} is not supported: it must be -1 (one group per row) "
            "or a positive multiple of 16 (the kernel's K tile)"
        )
    fmt = quant.get("checkpoint_format", quant.get("format", "gptq"))
    if fmt not in ZERO_OFFSETS:
        raise ValueError(
            f"GPTQ checkpoint_format {fmt!r} is not supported: this engine reads 'gptq' "
            "(AutoGPTQ, GPTQModel v1) and 'gptq_v2' (other formats lay the weights out "
            "differently)"
        )
    desc_act = quant.get("desc_act", False)
    if not isinstance(desc_act, bool):
        raise ValueError(f"GPTQ desc_act {desc_act!r} must be true or false")
    pack_dtype = quant.get("pack_dtype", "int32")
    if pack_dtype != "int32":
        raise ValueError(
            f"GPTQ pack_dtype {pack_dtype!r} is not supported: this engine reads int32 words"
        )
    if quant.get("lm_head"):
        raise ValueError(
            "GPTQ lm_head true (a quantized LM head) is not supported: this engine keeps the "
            "LM head in the model's dtype"
        )
    if quant.get("dynamic"):
        raise ValueError(
            f"GPTQ dynamic {quant['dynamic']!r} (per-module overrides) is not supported: this "
            "engine loads one bits / group_size for every quantized layer"
        )
    modules = quant.get("modules_in_block_to_quantize") or ()
    flat = [m for entry in modules for m in ([entry] if isinstance(entry, str) else entry)]
    return GptqConfig(group, desc_act, ZERO_OFFSETS[fmt], tuple(flat))


class GptqInt4(PrequantizedInt4):
    """GPTQ checkpoints: int4's layout and kernel, the quantized tensors loaded, not
    computed; with desc_act each layer gathers its inputs in group order first."""

    name = "gptq"

    def __init__(self, config: GptqConfig) -> None:
        super().__init__(config.group_size, reorders_inputs=config.desc_act)
        self.config = config

    def quantized(self, name: str) -> bool:
        modules = self.config.modules
        return not modules or any(name.endswith(f".{m}") for m in modules)

    def checkpoint_tensors(
        self, weights: Iterator[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        required = {"qweight", "qzeros", "scales"}
        return self.by_layer(weights, required, "g_idx", self.config.group_size)

    def _convert(self, prefix: str, parts: dict[str, torch.Tensor]) -> Tensors:
        q = unpack_nibbles(parts["qweight"].T, 1)  # [out, in]
        n = q.shape[0]
        zeros = unpack_nibbles(parts["qzeros"], 1)[:, :n]  # [groups, out]
        zero = zeros.T + self.config.zero_offset
        return int4_tensors(prefix, q, zero, parts["scales"].T, self.config.group_size,
                            parts.get("g_idx"), self)  # fmt: skip
