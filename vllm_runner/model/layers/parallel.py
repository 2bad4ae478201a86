"""Tensor-parallel state: world size 1 unless torch.distributed is initialised."""

import torch
import torch.distributed as dist


def tp_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def tp_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if tp_size() > 1:
        dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    if tp_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(tp_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def divide(n: int, parts: int, what: str) -> int:
    if n % parts:
        raise ValueError(f"{what}={n} is not divisible by the tensor-parallel size {parts}")
    return n // parts


def load_shard(dst: torch.Tensor, loaded: torch.Tensor, dim: int | None = None) -> None:
    """``dst`` <- this rank's shard of a checkpoint tensor along ``dim`` (None: all of it).
    A tensor of another shape is an error, never broadcast into ``dst`` or cut to fit."""
    want = list(dst.shape)
    if dim is not None:
        want[dim] *= tp_size()
    check_shape(loaded, want)
    if dim is not None:
        loaded = loaded.narrow(dim, tp_rank() * dst.shape[dim], dst.shape[dim])
    dst.copy_(loaded)


def check_shape(loaded: torch.Tensor, want: list[int] | tuple[int, ...]) -> None:
    """A checkpoint tensor's shape is the model's, or a ValueError naming both."""
    if tuple(loaded.shape) != tuple(want):
        raise ValueError(f"has shape {tuple(loaded.shape)}, {tuple(want)} expected")
