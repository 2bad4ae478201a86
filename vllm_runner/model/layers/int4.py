"""Weight-only 4-bit quantization (W4A16): group-wise, asymmetric (a zero point per group),
as AWQ checkpoints store it (``layers/awq.py`` loads those into the same layout).

Per output channel and group of ``group_size`` inputs (128; the last group may be short):
``lo = min(w, 0)``, ``hi = max(w, 0)``, ``scale = (hi - lo) / 15``,
``zero = round(-lo / scale)`` in 0..15, ``q = clamp(round(w / scale) + zero, 0, 15)``;
dequantized ``(q - zero) * scale``.

Error bound: ``|w - (q - zero) * scale| <= scale / 2`` for every weight. The range holds 0,
so ``-lo / scale`` lies in [0, 15] and so does its rounding, the zero; every ``w / scale + zero``
then lies within half a step of [0, 15], and neither the rounding nor the clamp moves it more
than half a step. (Without 0 in the range, a group of all-positive weights would clamp its
zero point and lose the top of its range.)

A quantized layer keeps ``weight`` (int32 [N, ceil(K / 8)], eight nibbles a word along K,
see ``kernels/quant_int4.py``), ``weight_scale`` (fp32 [N, groups]) and ``weight_zero``
(uint8 [N, groups]): parameters, so CPU offloading moves them like any other weight.
A lone decode row takes no fused one-row GEMV (``one_row_gemv`` stays False: the GEMV reads
8- and 16-bit weights): it runs the tiled kernel, and the norm, activation and residual add
run as their own kernels.
"""

import torch
import torch.nn.functional as F
from torch import nn

from kernels import reference
from vllm_runner.model.layers.linear import LinearBase
from vllm_runner.model.layers.quant import MIN_SCALE, QuantMethod

GROUP_SIZE = 128
INT4_MAX = 15
NIBBLES = 8  # per int32 word


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] integers in 0..15 -> [N, ceil(K / 8)] int32: nibble i (bits 4i..4i+3) of word j
    holds k = 8j + i; K is padded with zeros to whole words."""
    n, k = q.shape
    q = F.pad(q.to(torch.int64), (0, -k % NIBBLES)).view(n, -1, NIBBLES)
    words = (q << torch.arange(0, 32, 4, device=q.device)).sum(-1)  # in [0, 2**32)
    # NOTE: two's complement by hand: the top nibble sets the int32 sign bit
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def quantize_int4(
    w: torch.Tensor, group_size: int = GROUP_SIZE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] float -> (int32 [N, ceil(K / 8)], fp32 scale [N, groups], uint8 zero [N, groups])
    with ``|w - (q - zero) * scale| <= scale / 2`` (module docstring)."""
    n, k = w.shape
    groups = cdiv(k, group_size)
    # zeros pad the last group: they change neither lo nor hi, which hold 0 anyway
    wf = F.pad(w.float(), (0, groups * group_size - k)).view(n, groups, group_size)
    lo = wf.amin(dim=-1).clamp(max=0)
    hi = wf.amax(dim=-1).clamp(min=0)
    scale = ((hi - lo) / INT4_MAX).clamp(min=MIN_SCALE)  # all-zero groups: q = zero = 0
    zero = torch.round(-lo / scale).clamp(0, INT4_MAX)
    q = (torch.round(wf / scale[..., None]) + zero[..., None]).clamp(0, INT4_MAX)
    return pack_int4(q.view(n, -1)[:, :k]), scale, zero.to(torch.uint8)


class Int4WeightOnly(QuantMethod):
    """W4A16: int4 weights in groups of ``group_size`` inputs, activations in the model dtype."""

    name = "int4"
    weight_dtype = torch.int32  # eight weights a word

    def __init__(self, group_size: int = GROUP_SIZE) -> None:
        assert group_size > 0 and group_size % 16 == 0, (
            f"group_size {group_size} must be a positive multiple of 16 (the kernel's K tile)"
        )
        self.group_size = group_size

    def tensor_nbytes(self, layer: LinearBase) -> list[int]:
        n, groups = layer.out_features, cdiv(layer.in_features, self.group_size)
        return [n * cdiv(layer.in_features, NIBBLES) * 4, n * groups * 4, n * groups]

    def quantize(self, layer: LinearBase, device: torch.device) -> None:
        self._set_int4(layer, *quantize_int4(layer.weight.data.to(device), self.group_size))

    def _set_int4(
        self, layer: LinearBase, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor
    ) -> None:
        self._set(layer, packed, scale)
        layer.weight_zero = nn.Parameter(zero, requires_grad=False)

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        args = (layer.weight, layer.weight_scale, layer.weight_zero, self.group_size, bias)
        if x.is_cuda:
            from kernels.quant_int4 import w4a16_matmul

            return w4a16_matmul(x, *args)
        return reference.w4a16_linear(x, *args)  # dequantizes per call, as int8's CPU path
