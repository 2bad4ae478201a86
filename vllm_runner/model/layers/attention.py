"""Paged attention layer: writes this step's K/V into the cache, attends over the cache.

Two backends with one interface: Triton kernels on CUDA, ``kernels/reference.py`` on CPU.
The runner publishes per-step metadata with ``forward_context``.
"""

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from kernels import reference
from vllm_runner.model.layers.rotary import RotaryEmbedding


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64
    block_tables: torch.Tensor  # [num_reqs, max_blocks] int32
    seq_lens: torch.Tensor  # [num_reqs] int32
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32
    max_query_len: int
    max_seq_len: int
    num_decode_rows: int = 0  # leading requests with one query each (CUDA kernel choice)
    # One query each, none in its first step: on CUDA the decode kernel rotates, writes the
    # new keys / values and attends in one (see ``StepInputs.fused_decode``)
    fused_decode: bool = False
    # [rows of the decode kernel] int32: those rows, longest context first (CUDA: the longest
    # start first, so short ones fill the tail); None: in row order
    decode_order: torch.Tensor | None = None
    # CUDA, mixed steps: the prefill rows' query_start_loc (query_start_loc[d:] - d for
    # num_decode_rows d), once a step instead of once a layer; None: computed where needed
    prefill_query_start_loc: torch.Tensor | None = None


_metadata: AttentionMetadata | None = None


def layer_sliding_window(hf_config: object, layer: int) -> int:
    """Layer ``layer``'s window as transformers applies it (0: full attention): the config's
    sliding_window on the layers its layer_types marks "sliding_attention" (Gemma 2 / 3's
    pattern, Qwen2 / Qwen3 from max_window_layers on), on every layer of a config without
    layer_types (Mistral v0.1, Phi-3); none while Qwen's use_sliding_window is off."""
    window = getattr(hf_config, "sliding_window", None)
    if not window or getattr(hf_config, "use_sliding_window", True) is False:
        return 0
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types is not None and layer_types[layer] != "sliding_attention":
        return 0
    return int(window)


@contextlib.contextmanager
def forward_context(metadata: AttentionMetadata):
    global _metadata
    _metadata, previous = metadata, _metadata
    try:
        yield
    finally:
        _metadata = previous


class Attention(nn.Module):
    """``sliding_window`` (0: full attention): a query at position p sees the keys (p -
    sliding_window, p] only. ``softcap`` (0: none): scores x become softcap * tanh(x /
    softcap) (Gemma 2). The KV cache still holds every position (blocks before a window stay
    allocated)."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        sliding_window: int = 0,
        softcap: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window, self.softcap = sliding_window, softcap
        self.k_cache = self.v_cache = torch.empty(0)  # bound by the model runner

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rotary: RotaryEmbedding | None = None,
        positions: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """With ``rotary``, q and k are rotated here first (on CUDA fused with the cache
        write: the rotated key goes straight into the cache; in a pure decode step the decode
        attention kernel itself rotates, writes and attends). ``out`` ([num_tokens,
        num_heads * head_dim], contiguous): written and returned (piecewise graphs' static
        buffer)."""
        md = _metadata
        q = q.view(-1, self.num_heads, self.head_dim)  # [num_tokens, num_heads, head_dim]
        heads_out = None if out is None else out.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if q.is_cuda:
            from kernels.attention import paged_attention
            from kernels.kv_cache import rotary_and_write_kv_cache, write_kv_cache
            from kernels.paged_attention import NewTokens

            new_tokens = None
            if rotary is not None and md.fused_decode:  # decode: one kernel does it all
                new_tokens = NewTokens(positions, k, v, rotary.cos_sin_cache, md.slot_mapping)
            elif rotary is not None:
                q = rotary_and_write_kv_cache(
                    positions, q, k, v, rotary.cos_sin_cache,
                    self.k_cache, self.v_cache, md.slot_mapping,
                )  # fmt: skip
            else:
                write_kv_cache(k, v, self.k_cache, self.v_cache, md.slot_mapping)
            out = paged_attention(
                q,
                self.k_cache,
                self.v_cache,
                md.block_tables,
                md.seq_lens,
                md.query_start_loc,
                self.scale,
                md.max_query_len,
                md.max_seq_len,
                md.num_decode_rows,
                new_tokens,
                md.decode_order,
                heads_out,
                md.prefill_query_start_loc,
                self.sliding_window,
                self.softcap,
            )
        else:
            if rotary is not None:
                q, k = rotary(positions, q, k)
            reference.write_kv_cache(k, v, self.k_cache, self.v_cache, md.slot_mapping)
            result = reference.paged_attention(
                q,
                self.k_cache,
                self.v_cache,
                md.block_tables,
                md.seq_lens,
                md.query_start_loc,
                self.scale,
                self.sliding_window,
                self.softcap,
            )
            out = result if heads_out is None else heads_out.copy_(result)
        return out.view(-1, self.num_heads * self.head_dim)
