"""Tensor-parallel-aware linear layers. Each parameter carries a ``weight_loader`` that takes
the full HF checkpoint tensor and keeps this rank's shard."""

import os

import torch
import torch.nn.functional as F
from torch import nn

from vllm_runner.model.layers import cpu_gemm
from vllm_runner.model.layers.activation import silu_and_mul
from vllm_runner.model.layers.parallel import (
    all_reduce,
    check_shape,
    divide,
    load_shard,
    tp_size,
)

# A model's packed_modules_mapping (HF name -> (our layer, its shard)) where q / k / v load
# into one QKVParallelLinear and gate / up into one MergedColumnParallelLinear (Llama, Gemma)
QKV_GATE_UP_PACKED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def gemv_takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the one-row GEMV (``kernels.gemv``) runs ``x @ weight.T``: one fp16 / bf16 row
    on a GPU, world size 1, a weight of x's dtype or int8 / fp8 (W8A16) that the GEMV can
    read (``VLLM_RUNNER_GEMV=0``: never, for A/B timing)."""
    if not (x.is_cuda and x.dim() == 2 and x.shape[0] == 1 and tp_size() == 1):
        return False
    if x.dtype not in (torch.float16, torch.bfloat16):
        return False
    if weight.dtype not in (x.dtype, torch.int8, torch.float8_e4m3fn):
        return False
    from kernels.gemv import gemv_layout

    return gemv_layout(weight) and os.environ.get("VLLM_RUNNER_GEMV", "1") != "0"


class LinearBase(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)
        # A quantized layer replaces this with its own matmul (see layers/quant.py).
        self.quant_method = None
        self.cpu_packed: torch.Tensor | None = None  # oneDNN copy of weight (layers/cpu_gemm.py)
        self.lora = None  # enable_lora: the adapters' slots (lora/layers.py), added to matmul's

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.quant_method is not None:
            y = self.quant_method.apply(self, x, bias)
        elif self.cpu_packed is not None:
            y = cpu_gemm.linear(x, self.cpu_packed, bias)
        else:
            y = F.linear(x, self.weight, bias)
        return y if self.lora is None else self.lora.apply(x, y)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        load_shard(param.data, loaded)

    def fuses_one_row(self, x: torch.Tensor) -> bool:
        """Whether ``forward_one_row`` takes ``x`` (``gemv_takes``; a quantization method
        that runs one row on the GEMV); not with LoRA (its term comes after the matmul)."""
        if self.lora is not None:
            return False
        if self.quant_method is not None and not self.quant_method.one_row_gemv():
            return False
        return gemv_takes(x, self.weight)

    def forward_one_row(
        self,
        x: torch.Tensor,  # [1, in_features]
        *,
        norm: nn.Module | None = None,  # an RMSNorm of x's dtype, applied to x first
        residual: torch.Tensor | None = None,  # [1, out_features], added to the output
        gated: bool = False,  # a [gate; up] layer: silu(gate) * up
    ) -> torch.Tensor:
        """``residual + act(norm(x) @ W.T + b)`` in one GEMV (``kernels.gemv``); the
        caller checked ``fuses_one_row``."""
        norm_arg = (norm.weight, norm.eps) if norm is not None else None
        if self.quant_method is not None:
            return self.quant_method.apply_one_row(self, x, self.bias, gated=gated,
                                                   norm=norm_arg, residual=residual)  # fmt: skip
        from kernels.gemv import linear_one_row

        return linear_one_row(x, self.weight, self.bias, gated=gated, norm=norm_arg,
                              residual=residual)  # fmt: skip


class ReplicatedLinear(LinearBase):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; the output stays sharded (the row-parallel layer
    after it reads this rank's shard)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, divide(out_features, tp_size(), "out_features"), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        load_shard(param.data, loaded, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul (gate_proj + up_proj)."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False) -> None:
        super().__init__(in_features, sum(output_sizes), bias)
        self.shard_sizes = [divide(s, tp_size(), "output size") for s in output_sizes]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        """``shard_id``: which output ``loaded`` is (gate_proj 0, up_proj 1); None: all of
        them fused in the checkpoint (Phi-3's gate_up_proj), loaded part by part."""
        if shard_id is None:
            _load_fused(self, param, loaded, [s * tp_size() for s in self.shard_sizes])
            return
        size = self.shard_sizes[shard_id]
        offset = sum(self.shard_sizes[:shard_id])
        load_shard(param.data.narrow(0, offset, size), loaded, 0)

    def forward_silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` for a [gate, up] layer (SwiGLU); a quantized layer may fuse
        the activation into its matmul."""
        assert len(self.shard_sizes) == 2 and self.shard_sizes[0] == self.shard_sizes[1], (
            f"silu_and_mul needs two equal outputs, got {self.shard_sizes}"
        )
        if self.quant_method is not None and self.lora is None:
            return self.quant_method.apply_silu_and_mul(self, x, self.bias)
        return silu_and_mul(self.matmul(x, self.bias))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul; heads split across ranks."""

    def __init__(
        self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False
    ) -> None:
        self.num_heads = divide(num_heads, tp_size(), "num_attention_heads")
        self.num_kv_heads = divide(num_kv_heads, tp_size(), "num_key_value_heads")
        self.head_dim = head_dim
        super().__init__(hidden, (num_heads + 2 * num_kv_heads) * head_dim, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        """``shard_id``: "q", "k" or "v"; None: all three fused in the checkpoint (Phi-3's
        qkv_proj), loaded part by part (each rank keeps its heads of each)."""
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if shard_id is None:
            _load_fused(self, param, loaded, [q * tp_size(), kv * tp_size(), kv * tp_size()],
                        ["q", "k", "v"])  # fmt: skip
            return
        size, offset = {"q": (q, 0), "k": (kv, q), "v": (kv, q + kv)}[shard_id]
        load_shard(param.data.narrow(0, offset, size), loaded, 0)


def _load_fused(
    layer: ColumnParallelLinear,
    param: nn.Parameter,
    loaded: torch.Tensor,  # [sum(sizes), ...]: the outputs of every rank, part after part
    sizes: list[int],
    shard_ids: list | None = None,  # of the parts (None: 0, 1, ...)
) -> None:
    check_shape(loaded, [sum(sizes), *param.shape[1:]])
    for shard_id, part in zip(shard_ids or range(len(sizes)), loaded.split(sizes), strict=True):
        layer.weight_loader(param, part, shard_id)


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs are summed with an all-reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(divide(in_features, tp_size(), "in_features"), out_features, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        # the bias is added once, after the reduce
        load_shard(param.data, loaded, None if param.dim() == 1 else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = all_reduce(self.matmul(x, None))
        return y + self.bias if self.bias is not None else y
