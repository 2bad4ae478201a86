"""Weight quantization of the decoder's linear layers, applied after the checkpoint loads.

- ``int8``: weight-only (W8A16), symmetric, one scale per output channel. Triton kernel on CUDA
  (int8 tiles widened in registers); on CPU the reference path widens per call.
- ``fp8``: W8A8 e4m3, one scale per output channel for weights and one per token for
  activations (computed each call), multiplied by ``torch._scaled_mm`` (compute capability
  >= 8.9).

A quantized layer keeps ``weight`` (now int8 / fp8, ``[out, in]``) and gains ``weight_scale``
(fp32 ``[out]``), both parameters, so offloading moves them like any other weight.
Embeddings and the LM head stay in the model dtype.

``int4`` (W4A16, group-wise) is in ``layers/int4.py``; ``awq``, ``gptq`` and
``compressed-tensors`` (4-bit checkpoints loaded into int4's layout) in
``layers/prequantized.py`` and each format's module; all build on ``QuantMethod`` from here.
"""

import logging

import torch
from torch import nn

from kernels import reference
from vllm_runner.model.layers.activation import silu_and_mul
from vllm_runner.model.layers.linear import LinearBase

logger = logging.getLogger(__name__)

INT8_MAX = 127
FP8_DTYPE = torch.float8_e4m3fn
MIN_SCALE = 1e-12  # all-zero rows / tokens: any scale works, avoid 0 / 0


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (int8 [out, in], fp32 scale [out]); |w - q * scale| <= scale / 2."""
    wf = w.float()
    scale = (wf.abs().amax(dim=1) / INT8_MAX).clamp(min=MIN_SCALE)
    q = torch.round(wf / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3 quantization along the last dim: (fp8 [..., K], fp32 scale [...]).

    Used for weights (a row = an output channel) and for activations (a row = a token).
    """
    return reference.fp8_quantize_rows(x)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 ``q * scale`` with one scale per row (last dim is the row)."""
    return q.float() * scale[..., None]


def fp8_supported(device: torch.device) -> tuple[bool, str]:
    """Whether ``torch._scaled_mm`` with fp8 runs on ``device``, and what the device is."""
    if device.type != "cuda":
        return False, f"device {device.type!r} has no fp8 tensor cores"
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    name = torch.cuda.get_device_name(index)
    return (major, minor) >= (8, 9), f"{name} has compute capability {major}.{minor}"


class QuantMethod:
    """Quantizes a ``LinearBase`` in place and runs its matmul (``LinearBase.quant_method``)."""

    name = ""
    weight_dtype = torch.int8
    # The checkpoint is stored quantized (AWQ): its layers load their quantized tensors,
    # none is quantized here.
    prequantized = False

    def supports(self, layer: LinearBase) -> bool:
        return True

    def quantize(self, layer: LinearBase, device: torch.device) -> None:
        raise NotImplementedError

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def apply_silu_and_mul(
        self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """``silu(gate) * up`` of a merged [gate; up] layer; methods with a fused kernel
        override this."""
        return silu_and_mul(self.apply(layer, x, bias))

    def one_row_gemv(self) -> bool:
        """Whether one row runs the W8A16 GEMV, which then also takes the decode layer's
        fusions (``apply_one_row``)."""
        return False

    def apply_one_row(
        self,
        layer: LinearBase,
        x: torch.Tensor,  # [1, K] on a GPU
        bias: torch.Tensor | None,
        *,
        gated: bool,
        norm: tuple[torch.Tensor, float] | None,
        residual: torch.Tensor | None,
    ) -> torch.Tensor:
        """``LinearBase.forward_one_row`` of a quantized layer, on the W8A16 GEMV."""
        from kernels.quant_matmul import w8a16_matmul

        return w8a16_matmul(x, layer.weight, layer.weight_scale, bias, gated=gated, norm=norm,
                            residual=residual)  # fmt: skip

    def tensor_nbytes(self, layer: LinearBase) -> list[int]:
        """Bytes of each tensor that replaces the layer's weight once quantized (the weight,
        then its scales); works on meta modules."""
        return [layer.weight.numel() * self.weight_dtype.itemsize, layer.out_features * 4]

    def weight_nbytes(self, layer: LinearBase) -> int:
        """Bytes of the layer's weight (+ scales) once quantized; works on meta modules."""
        if not self.supports(layer):
            return layer.weight.nbytes
        return sum(self.tensor_nbytes(layer))

    def _set(self, layer: LinearBase, q: torch.Tensor, scale: torch.Tensor) -> None:
        layer.weight = nn.Parameter(q, requires_grad=False)
        layer.weight_scale = nn.Parameter(scale, requires_grad=False)
        layer.quant_method = self


class Int8WeightOnly(QuantMethod):
    """W8A16: int8 weights, activations stay in the model dtype."""

    name = "int8"
    weight_dtype = torch.int8

    def quantize(self, layer: LinearBase, device: torch.device) -> None:
        self._set(layer, *quantize_int8(layer.weight.data.to(device)))

    def one_row_gemv(self) -> bool:
        return True

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.is_cuda:
            from kernels.quant_matmul import w8a16_matmul

            return w8a16_matmul(x, layer.weight, layer.weight_scale, bias)
        return reference.w8a16_linear(x, layer.weight, layer.weight_scale, bias)

    def apply_silu_and_mul(
        self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        if x.is_cuda:  # the activation in the matmul's epilogue
            from kernels.quant_matmul import w8a16_matmul

            return w8a16_matmul(x, layer.weight, layer.weight_scale, bias, gated=True)
        return super().apply_silu_and_mul(layer, x, bias)


class Fp8W8A8(QuantMethod):
    """W8A8 e4m3: per-channel weight scales, dynamic per-token activation scales."""

    name = "fp8"
    weight_dtype = FP8_DTYPE
    # Steps of at most this many tokens skip activation quantization and run the fp8 weights
    # through the W8A16 Triton kernel (widened in registers, exact); 0 = always _scaled_mm.
    # NOTE: a lone decode row is a weight stream that _scaled_mm pads out to a tensor-core
    # tile (batch-1 8B on an H200: 0.91x bf16; the GEMV: 1.42x). The trade-off: a request
    # decoding alone skips the activation rounding it gets when batched, so fp8 greedy
    # tokens can depend on the batch (int8 differs only in summation order).
    weight_only_max_tokens = 1

    def supports(self, layer: LinearBase) -> bool:
        # NOTE: torch._scaled_mm needs K and N divisible by 16.
        return layer.in_features % 16 == 0 and layer.out_features % 16 == 0

    def quantize(self, layer: LinearBase, device: torch.device) -> None:
        self._set(layer, *quantize_fp8_rows(layer.weight.data.to(device)))

    def one_row_gemv(self) -> bool:
        return self.weight_only_max_tokens >= 1

    def _weight_only(self, x: torch.Tensor) -> bool:
        """Whether this step's rows skip activation quantization (see weight_only_max_tokens)."""
        return x.is_cuda and x.numel() // x.shape[-1] <= self.weight_only_max_tokens

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # [M, K]
        if self._weight_only(x):
            from kernels.quant_matmul import w8a16_matmul

            return w8a16_matmul(x, layer.weight, layer.weight_scale, bias)
        if x.is_cuda:
            from kernels.quant_matmul import fp8_quantize_rows

            xq, x_scale = fp8_quantize_rows(x2)
        else:  # only unit tests get here: the engine refuses fp8 off CUDA
            xq, x_scale = quantize_fp8_rows(x2)
        out = fp8_scaled_mm(xq, x_scale, layer.weight, layer.weight_scale, x.dtype)
        if bias is not None:
            out = out + bias
        return out.view(*x.shape[:-1], out.shape[-1])

    def apply_silu_and_mul(
        self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        if self._weight_only(x):
            from kernels.quant_matmul import w8a16_matmul

            return w8a16_matmul(x, layer.weight, layer.weight_scale, bias, gated=True)
        return super().apply_silu_and_mul(layer, x, bias)


def fp8_scaled_mm(
    xq: torch.Tensor,  # [M, K] fp8
    x_scale: torch.Tensor,  # [M] fp32
    wq: torch.Tensor,  # [N, K] fp8
    w_scale: torch.Tensor,  # [N] fp32
    out_dtype: torch.dtype,
) -> torch.Tensor:  # [M, N]
    """``(xq * x_scale) @ (wq * w_scale).T`` with row-wise scales."""
    if not xq.is_cuda:  # unit tests only
        return (dequantize_rows(xq, x_scale) @ dequantize_rows(wq, w_scale).T).to(out_dtype)
    # NOTE: row-wise scaled _scaled_mm emits bf16 only; other model dtypes take one cast.
    out = torch._scaled_mm(
        xq,
        wq.t(),  # [K, N] column-major, as _scaled_mm wants
        scale_a=x_scale.view(-1, 1),
        scale_b=w_scale.view(1, -1),
        out_dtype=torch.bfloat16,
    )
    return out if out_dtype == torch.bfloat16 else out.to(out_dtype)


QUANT_METHODS = ("awq", "compressed-tensors", "fp8", "gptq", "int4", "int8")


def get_quant_method(
    quantization: str | None, device: torch.device, hf_config: object = None
) -> QuantMethod | None:
    """The method for an EngineArgs ``quantization`` value; fails early where it cannot run.
    Pre-quantized formats (awq, gptq, compressed-tensors) read their settings from
    ``hf_config``'s quantization_config."""
    if quantization is None:
        return None
    if quantization not in QUANT_METHODS:
        raise ValueError(f"quantization must be one of {list(QUANT_METHODS)} or None")
    if quantization == "int8":
        return Int8WeightOnly()
    if quantization == "int4":  # (int4.py and its users build on this module: imported here)
        from vllm_runner.model.layers.int4 import Int4WeightOnly

        return Int4WeightOnly()
    if quantization in ("awq", "compressed-tensors", "gptq"):
        from vllm_runner.model.layers.prequantized import prequantized_method

        return prequantized_method(quantization, getattr(hf_config, "quantization_config", None))
    ok, what = fp8_supported(device)
    if not ok:
        raise ValueError(
            f"quantization='fp8' needs torch._scaled_mm on a CUDA GPU of compute capability "
            f">= 8.9 (Ada, Hopper or newer), but {what}; use quantization='int8' "
            "(weight-only, runs on any device) or quantization=None"
        )
    return Fp8W8A8()


def quantize_module(module: nn.Module, method: QuantMethod, device: torch.device) -> int:
    """Quantize every not-yet-quantized linear layer under ``module`` (results on ``device``);
    returns how many layers were quantized."""
    count = 0
    for name, layer in module.named_modules():
        if not isinstance(layer, LinearBase) or layer.quant_method is not None:
            continue
        if not method.supports(layer):
            logger.info("%s: %s stays unquantized (shape not supported)", method.name, name)
            continue
        method.quantize(layer, device)
        count += 1
    return count
