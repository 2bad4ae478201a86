"""The adapters' term on a linear layer's output, for every token of a step at once.

Each LoRA-capable layer holds ``max_loras`` device slots of stacked weights; each token
names its slot (-1: the base model). The term is dense and of fixed shape, so CUDA graphs
capture it like the rest of the step (no gather, no host sync):

    shrink = x @ A_all.T                     # [tokens, slices * slots * r_max]
    shrink = where(column's slot == token's slot, shrink, 0)
    y[:, slice] += shrink[:, slice's columns] @ B_all[:, slice's outputs]

Its cost grows with ``max_loras * max_lora_rank`` (two thin GEMMs a layer): for a few
slots of rank 8-64 it is small next to the layer's own GEMM.
"""

import torch

from vllm_runner.model.layers.linear import (
    LinearBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
)


class LoRASlots:
    """The step's per-token slot indices, which every LoRA layer reads."""

    def __init__(self, max_tokens: int, device: torch.device) -> None:
        # NOTE: persistent: a captured graph reads tokens[:n] at this address on each replay
        self.tokens = torch.full((max_tokens,), -1, dtype=torch.int64, device=device)
        self.kept: torch.Tensor | None = None  # [rows kept past the last attention]
        self.active = True  # False: no token of the step has an adapter (eager steps skip)

    def rows(self, n: int) -> torch.Tensor:
        """The slots of a layer input of ``n`` rows: the step's tokens, or the rows the
        last layer keeps (sorted, distinct: when as many as the tokens, the same rows)."""
        if self.kept is not None and n == len(self.kept):
            return self.kept
        return self.tokens[:n]


class LoRALayer:
    """A linear layer's adapter slots. ``slices``: (output offset, size) of each part that
    takes an adapter of its own (q, k, v of a fused qkv layer; else the whole layer)."""

    def __init__(
        self,
        layer: LinearBase,
        slices: list[tuple[int, int]],
        slots: LoRASlots,
        max_loras: int,
        max_rank: int,
        dtype: torch.dtype,  # the model's (a quantized layer's weight is not)
    ) -> None:
        self.slices, self.slots = slices, slots
        self.max_loras, self.max_rank = max_loras, max_rank
        width = max_loras * max_rank
        new = dict(dtype=dtype, device=slots.tokens.device)
        self.a = torch.zeros(len(slices) * width, layer.in_features, **new)  # rows: slice, slot, r
        self.b = torch.zeros(width, layer.out_features, **new)  # rows: slot, r; columns: outputs
        columns = torch.arange(len(slices) * width, device=slots.tokens.device)
        self.column_slot = columns // max_rank % max_loras  # [slices * width]

    def set(self, slot: int, part: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Slot ``slot``'s weights of slice ``part``: ``a`` [r, in], ``b`` [r, size] (B
        transposed, its scale folded in), or None: no adapter term there."""
        r0 = (part * self.max_loras + slot) * self.max_rank
        offset, size = self.slices[part]
        rows_a = self.a[r0 : r0 + self.max_rank]
        rows_b = self.b[slot * self.max_rank : (slot + 1) * self.max_rank, offset : offset + size]
        rows_a.zero_()
        rows_b.zero_()
        if a is not None:
            rank = a.shape[0]
            rows_a[:rank].copy_(a, non_blocking=True)
            rows_b[:rank].copy_(b, non_blocking=True)

    def apply(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y`` ([tokens, out], the layer's output) plus each token's adapter term."""
        if not self.slots.active:
            return y
        slots = self.slots.rows(x.shape[0])  # [tokens]
        shrink = x @ self.a.T  # [tokens, slices * slots * r_max]
        shrink = torch.where(slots[:, None] == self.column_slot, shrink, 0)
        if len(self.slices) == 1:
            return y.addmm_(shrink, self.b)
        width = self.max_loras * self.max_rank
        for part, (offset, size) in enumerate(self.slices):
            y[:, offset : offset + size].addmm_(
                shrink[:, part * width : (part + 1) * width], self.b[:, offset : offset + size]
            )
        return y


def layer_slices(layer: LinearBase) -> dict[object, tuple[int, int]]:
    """The parts of a layer that take adapters of their own, by shard id: q / k / v of a
    fused qkv layer, 0 / 1 of a fused gate_up layer; else the whole layer (None). Each is
    (output offset, size)."""
    if isinstance(layer, QKVParallelLinear):
        q, kv = layer.num_heads * layer.head_dim, layer.num_kv_heads * layer.head_dim
        return {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}
    if isinstance(layer, MergedColumnParallelLinear):
        offsets = [sum(layer.shard_sizes[:i]) for i in range(len(layer.shard_sizes))]
        return {i: (o, s) for i, (o, s) in enumerate(zip(offsets, layer.shard_sizes, strict=True))}
    return {None: (0, layer.out_features)}
