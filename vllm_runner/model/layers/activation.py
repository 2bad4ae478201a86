"""The gated MLP activation on either backend."""

import torch

from kernels import reference


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [..., 2 * d] -> [..., d]
    """``silu(gate) * up`` of a merged [gate | up] output: Triton on CUDA, torch elsewhere."""
    if x.is_cuda:
        from kernels.activation import silu_and_mul as triton_silu_and_mul

        out = triton_silu_and_mul(x.reshape(-1, x.shape[-1]))
        return out.view(*x.shape[:-1], out.shape[-1])
    return reference.silu_and_mul(x)
