"""AWQ checkpoints (AutoAWQ's 4-bit "gemm" format), loaded into int4's layout (layers/int4.py).

An AWQ checkpoint's config.json carries ``quantization_config`` {"quant_method": "awq",
"bits": 4, "group_size": G, "zero_point": true, "version": "gemm"}; each quantized linear
layer stores, instead of ``weight`` [out, in]:
- ``qweight`` int32 [in, out / 8]: eight 4-bit weights of one input, along the outputs;
- ``qzeros`` int32 [in / G, out / 8]: the zero points, packed the same way;
- ``scales`` fp16 [in / G, out];
dequantized ``(q - zero) * scale``, int4's convention. Within a word, output column
``8c + AWQ_PACK_ORDER[i]`` sits in nibble ``i`` (bits 4i..4i+3), the order AutoAWQ's packer
writes: columns 2j and 2j + 1 at the same place in the word's two 16-bit halves.

At load each tensor becomes its int4 counterpart (``weight``, ``weight_zero``,
``weight_scale``, output channels first), exactly; the loader then merges q/k/v and gate/up
as for float checkpoints. (GPTQ: ``gptq.py``; what the formats share: ``prequantized.py``.)
"""

import dataclasses
from collections.abc import Iterator

import torch

from vllm_runner.model.layers.int4 import pack_int4
from vllm_runner.model.layers.prequantized import PrequantizedInt4, describe

AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column 8c + ORDER[i]
# where the column 8c + j sits: nibble AWQ_PACK_ORDER.index(j)
_NIBBLE_OF_COLUMN = tuple(AWQ_PACK_ORDER.index(j) for j in range(8))
# checkpoint tensor -> the int4 parameter it loads into
AWQ_TENSORS = {"qweight": "weight", "qzeros": "weight_zero", "scales": "weight_scale"}


@dataclasses.dataclass(frozen=True)
class AwqConfig:
    """The parts of an AWQ quantization_config this engine reads."""

    group_size: int
    # layers left in float (name fragments, matched against the checkpoint's layer names)
    modules_to_not_convert: tuple[str, ...] = ()


def awq_config(quant: object) -> AwqConfig:
    """Validate an AWQ ``quantization_config`` (config.json's dict); errors name the value."""
    if not isinstance(quant, dict) or quant.get("quant_method") != "awq":
        raise ValueError(
            "quantization='awq' needs an AWQ checkpoint (config.json quantization_config with "
            f"quant_method 'awq'); this one has {describe(quant)}"
        )
    bits = quant.get("bits", quant.get("w_bit"))
    if bits != 4:
        raise ValueError(f"AWQ bits {bits!r} is not supported: this engine loads 4-bit AWQ only")
    version = quant.get("version", "gemm")
    if str(version).lower() != "gemm":
        raise ValueError(
            f"AWQ version {version!r} is not supported: this engine reads AutoAWQ's 'gemm' "
            "packing only ('gemv', 'gemv_fast' and 'marlin' lay the weights out differently)"
        )
    zero_point = quant.get("zero_point", True)
    if zero_point is not True:
        raise ValueError(
            f"AWQ zero_point {zero_point!r} is not supported: this engine loads AWQ with zero "
            "points (zero_point true, AutoAWQ's default)"
        )
    group = quant.get("group_size", quant.get("q_group_size"))
    if isinstance(group, bool) or not isinstance(group, int) or group <= 0 or group % 16:
        raise ValueError(
            f"AWQ group_size {group!r} is not supported: it must be a positive multiple of 16 "
            "(the kernel's K tile; -1, one group per row, is not supported)"
        )
    skip = quant.get("modules_to_not_convert") or ()
    return AwqConfig(group, tuple(skip))


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """[R, C / 8] int32 in AWQ's order -> [R, C] int32 values 0..15, columns in order."""
    if packed.dtype != torch.int32:
        raise ValueError(f"is {packed.dtype}, not the int32 words of AWQ's packing")
    shifts = 4 * torch.tensor(_NIBBLE_OF_COLUMN, dtype=torch.int32, device=packed.device)
    return ((packed[..., None] >> shifts) & 0xF).flatten(-2)


def convert_awq_tensor(name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
    """One checkpoint tensor -> (our parameter name, our tensor): ``qweight`` / ``qzeros`` /
    ``scales`` to int4's ``weight`` / ``weight_zero`` / ``weight_scale`` (output channels
    first); other tensors unchanged."""
    prefix, _, leaf = name.rpartition(".")
    if leaf not in AWQ_TENSORS:
        return name, tensor
    try:
        if leaf == "qweight":  # [in, out / 8] -> [out, in / 8] words along the inputs
            converted = pack_int4(unpack_awq(tensor).T)
        elif leaf == "qzeros":  # [in / G, out / 8] -> [out, in / G]
            converted = unpack_awq(tensor).T.to(torch.uint8).contiguous()
        else:  # [in / G, out] fp16 -> [out, in / G] fp32 (exact)
            converted = tensor.T.float().contiguous()
    except ValueError as e:
        raise ValueError(f"checkpoint tensor {name!r} {e}") from None
    return f"{prefix}.{AWQ_TENSORS[leaf]}", converted


class AwqInt4(PrequantizedInt4):
    """AWQ checkpoints: int4's layout and kernel, the quantized tensors loaded, not computed;
    layers in ``modules_to_not_convert`` keep float weights."""

    name = "awq"

    def __init__(self, config: AwqConfig) -> None:
        super().__init__(config.group_size)
        self.config = config

    def quantized(self, name: str) -> bool:
        return not any(fragment in name for fragment in self.config.modules_to_not_convert)

    def checkpoint_tensors(
        self, weights: Iterator[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            yield convert_awq_tensor(name, tensor)
