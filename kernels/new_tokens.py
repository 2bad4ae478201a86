"""``NewTokens``: the keys and values of a decode step that ``kernels.paged_attention``'s
kernel rotates, writes into the cache and attends to itself."""

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class NewTokens:
    """This step's un-rotated keys and values for ``paged_attention_decode`` to rotate (with
    the query), write into the cache and attend to, in the same kernel. Views of a fused qkv
    output are fine (dense head_dim)."""

    positions: torch.Tensor  # [num_reqs] int32 / int64
    key: torch.Tensor  # [num_reqs, num_kv_heads, head_dim]
    value: torch.Tensor  # [num_reqs, num_kv_heads, head_dim]
    cos_sin_cache: torch.Tensor  # [max_positions, rotary_dim] fp32: cos half | sin half
    slot_mapping: torch.Tensor  # [num_reqs] int32 / int64; requests with seq_len 0: unused

    def check(self, query: torch.Tensor, k_cache: torch.Tensor) -> None:
        num_reqs, _, head_dim = query.shape
        kv_shape = (num_reqs, k_cache.shape[2], head_dim)
        assert self.key.shape == self.value.shape == kv_shape, (
            f"key {tuple(self.key.shape)} / value {tuple(self.value.shape)} vs {kv_shape}"
        )
        assert self.key.dtype == self.value.dtype == query.dtype, (
            f"key {self.key.dtype} / value {self.value.dtype} vs query {query.dtype}"
        )
        assert self.key.stride(2) == self.value.stride(2) == 1, "key/value need a dense head_dim"
        assert self.positions.shape == self.slot_mapping.shape == (num_reqs,), (
            f"positions {tuple(self.positions.shape)} / slot_mapping "
            f"{tuple(self.slot_mapping.shape)} vs {num_reqs} requests"
        )
        for name in ("positions", "slot_mapping"):  # read at stride 1, a row per request
            t = getattr(self, name)
            assert t.dtype in (torch.int32, torch.int64) and t.is_contiguous(), (
                f"{name} {t.dtype} {t.stride()} must be a contiguous int32 / int64 tensor"
            )
        assert self.cos_sin_cache.dim() == 2, (
            f"cos_sin_cache {tuple(self.cos_sin_cache.shape)} must be [positions, rotary_dim]"
        )
        tensors = (query, k_cache, self.positions, self.key, self.value, self.cos_sin_cache,
                   self.slot_mapping)  # fmt: skip
        assert len({t.device for t in tensors}) == 1, "all inputs must be on one device"
        rotary_dim = self.cos_sin_cache.shape[1]
        assert rotary_dim % 2 == 0 and rotary_dim <= head_dim, (
            f"rotary_dim {rotary_dim} must be even and <= head_dim {head_dim}"
        )
        assert self.cos_sin_cache.stride(1) == 1, "cos_sin_cache needs a dense last dim"
