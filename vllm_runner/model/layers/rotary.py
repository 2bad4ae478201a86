"""Rotary position embedding, with the Llama-3, linear, YaRN, LongRoPE and dynamic NTK
scalings."""

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


def rope_max_positions(hf_config: object) -> int:
    """Positions the rotary embedding serves: ``max_position_embeddings``, or with YaRN the
    original context times the factor (Qwen2.5 keeps 32768 there and extends it 4x with
    YaRN), or with linear interpolation that times the factor (vicuna-7b-v1.5-16k: 4096 x 4);
    read as vLLM reads them. (Dynamic NTK past max_position_embeddings changes every
    frequency with the sequence's length, so it stays at max_position_embeddings; LongRoPE's
    max_position_embeddings is already its extended context.)"""
    max_positions = getattr(hf_config, "max_position_embeddings", None) or 2048
    _, scaling = rope_settings(hf_config)
    rope_type, factor = scaling.get("rope_type") or scaling.get("type"), scaling.get("factor")
    if rope_type == "yarn" and factor:
        old_len = scaling.get("original_max_position_embeddings") or max_positions
        return max(max_positions, int(old_len * factor))
    if rope_type == "linear" and factor and factor > 1:
        return int(max_positions * factor)
    return max_positions


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, scaled)
    return torch.where(wavelen < old_len / high, inv_freq, scaled)


def _yarn_inv_freq(
    inv_freq: torch.Tensor, scaling: dict, theta: float, max_positions: int
) -> tuple[torch.Tensor, float]:
    """YaRN (Qwen2.5's long-context setting): the high-frequency dimensions keep their
    frequency, the low ones are divided by ``factor``, a linear ramp between them; cos and
    sin are scaled by the attention factor. Returns (inv_freq, attention factor)."""
    old_len = scaling.get("original_max_position_embeddings") or max_positions
    factor = scaling.get("factor") or max_positions / old_len
    dim = 2 * len(inv_freq)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = scaling.get("attention_factor")
    if attention is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def dim_of(rotations: float) -> float:  # the dimension turning `rotations` times
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(scaling.get("beta_fast") or 32), dim_of(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = (torch.arange(dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)
    keep = 1 - ramp.clamp(0, 1)  # 1: the original frequency, 0: divided by factor
    return inv_freq / factor * (1 - keep) + inv_freq * keep, float(attention)


def _longrope_inv_freq(
    inv_freq: torch.Tensor, scaling: dict, max_positions: int, max_model_len: int
) -> tuple[torch.Tensor, float]:
    """LongRoPE (Phi-3.5, Phi-4-mini): each frequency divided by a factor of its own, from
    ``long_factor`` when the engine serves positions past the original context, else from
    ``short_factor``; cos and sin scaled by the attention factor. Returns (inv_freq,
    attention factor).

    NOTE: HF switches to the long factors in a forward whose sequence passes the original
    context, leaving the keys cached before it rotated by the short ones; a position's
    rotation here depends on the engine's max_model_len alone (as vLLM's), so that cached
    keys, prefix-cache hits and batches agree. That is HF's rotation for every sequence of an
    engine within the original context, and for prompts longer than it otherwise."""
    old_len = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or max_positions / old_len
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(old_len))
    name = "long_factor" if max_model_len > old_len else "short_factor"
    factors = scaling.get(name)
    if factors is None or len(factors) != len(inv_freq):
        raise ValueError(
            f"rope_scaling type 'longrope' needs {name} of {len(inv_freq)} values (rotary_dim "
            f"// 2), got {None if factors is None else len(factors)}"
        )
    return inv_freq / torch.tensor(factors, dtype=torch.float64), float(attention)


class RotaryEmbedding(nn.Module):
    def __init__(
        self,
        rotary_dim: int,
        max_positions: int,
        theta: float,
        scaling: dict,
        max_model_len: int | None = None,  # positions the engine serves (LongRoPE's choice)
    ) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
        rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
        attention = 1.0  # cos and sin scaled by it (YaRN, LongRoPE)
        if rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        elif rope_type == "linear":
            inv_freq = inv_freq / scaling["factor"]
        elif rope_type == "yarn":
            inv_freq, attention = _yarn_inv_freq(inv_freq, scaling, theta, max_positions)
        elif rope_type == "longrope":
            served = max_model_len or max_positions
            inv_freq, attention = _longrope_inv_freq(inv_freq, scaling, max_positions, served)
        elif rope_type not in ("default", "dynamic"):
            # NOTE: dynamic NTK changes the frequencies only past max_position_embeddings,
            # which caps max_model_len: within it, it is the default rope (as in HF)
            raise ValueError(
                f"rope_scaling type {rope_type!r} is not supported "
                "(supported: default, dynamic, linear, llama3, longrope, yarn)"
            )
        t = torch.arange(max_positions, dtype=torch.float64)
        freqs = torch.outer(t, inv_freq)
        cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1) * attention
        cache = cache.float()  # [max_pos, rotary_dim]
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        if q.is_cuda:
            from kernels.rotary import rotary_embedding
        else:
            rotary_embedding = reference.rotary_embedding
        return rotary_embedding(positions, q, k, self.cos_sin_cache)
