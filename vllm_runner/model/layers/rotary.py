"""Rotary position embedding, with the Llama-3 frequency scaling."""

import math

import torch
from torch import nn

from kernels import reference


def rope_settings(hf_config: object) -> tuple[float, dict]:
    """(theta, scaling dict) from either the transformers-4 or -5 config layout."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    scaling = getattr(hf_config, "rope_scaling", None) or params
    theta = params.get("rope_theta") or getattr(hf_config, "rope_theta", None) or 10000.0
    return float(theta), dict(scaling or {})


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, scaled)
    return torch.where(wavelen < old_len / high, inv_freq, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, rotary_dim: int, max_positions: int, theta: float, scaling: dict) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
        rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
        if rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        elif rope_type == "linear":
            inv_freq = inv_freq / scaling["factor"]
        elif rope_type != "default":
            raise ValueError(
                f"rope_scaling type {rope_type!r} is not supported "
                "(supported: default, linear, llama3)"
            )
        t = torch.arange(max_positions, dtype=torch.float64)
        freqs = torch.outer(t, inv_freq)
        cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1).float()  # [max_pos, rotary_dim]
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        if q.is_cuda:
            from kernels.rotary import rotary_embedding
        else:
            rotary_embedding = reference.rotary_embedding
        return rotary_embedding(positions, q, k, self.cos_sin_cache)
