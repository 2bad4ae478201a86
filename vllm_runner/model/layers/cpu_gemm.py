"""oneDNN GEMMs for the CPU path: linear weights reordered once, at load, into oneDNN's
blocked layout.

``F.linear`` on CPU goes through MKL, whose generic code path on AMD processors reached
~90 GFLOP/s on this project's 2-core dev VM for SmolLM2's shapes at 32 rows; the same
matmuls on reordered weights reached ~360 GFLOP/s (4x at 4-64 rows, 2.7x at 1 row). Results
are fp32-accurate but not bitwise equal to ``F.linear`` (another summation order).
"""

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


def supported(dtype: torch.dtype) -> bool:
    """oneDNN linear on this CPU for this dtype (fp32; bf16 where the CPU has bf16 units)."""
    ops = torch.ops.mkldnn
    if not torch.backends.mkldnn.is_available() or not hasattr(ops, "_linear_pointwise"):
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and ops._is_mkldnn_bf16_supported()


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] weight -> an opaque oneDNN tensor for ``linear`` (a copy: ``weight`` stays)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``packed = pack(weight)``; ``x`` is [..., in]."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.ops.mkldnn._linear_pointwise(x2, packed, bias, "none", [], "")
    return out.view(*x.shape[:-1], out.shape[-1])


def pack_model(model: nn.Module) -> int:
    """Give every float linear layer and the LM head of a CPU model a packed weight
    (``cpu_packed``, used by their matmul); returns how many were packed.

    The dense weight a packed layer no longer reads becomes a meta tensor (same shape and
    dtype, no storage), so memory holds one copy and ``stats()`` still counts its bytes. An LM
    head tied to the embedding keeps the shared dense weight (the lookup reads it); its packed
    copy is a snapshot taken here.
    """
    from vllm_runner.model.layers.embedding import ParallelLMHead, VocabParallelEmbedding
    from vllm_runner.model.layers.linear import LinearBase

    embedding_weights = {id(m.weight) for m in model.modules() if type(m) is VocabParallelEmbedding}
    count = 0
    for module in model.modules():
        if isinstance(module, LinearBase) and module.quant_method is not None:
            continue
        if isinstance(module, LinearBase | ParallelLMHead):
            weight = module.weight
            if weight.device.type != "cpu" or not supported(weight.dtype):
                continue
            module.cpu_packed = pack(weight)
            if id(weight) not in embedding_weights:
                module.weight = nn.Parameter(weight.to("meta"), requires_grad=False)
            count += 1
    if count:
        logger.info("CPU: %d linear layers use oneDNN-packed weights", count)
    return count
