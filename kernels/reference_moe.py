"""The fused MoE's routing step in torch ops (``kernels.moe_align``'s reference), in its own
file for reference.py's length; ``kernels.reference`` exports it as ``align_pairs``."""

import torch


def align_pairs(
    topk_ids: torch.Tensor,  # [num_tokens, top_k], each < num_experts
    num_experts: int,
    block_m: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted pairs [max_tiles * block_m] int32: the pairs of each expert in pair order, the
    run padded to a multiple of block_m with num_pairs; the expert of each M tile [max_tiles]
    int32, the last expert past the padded count; the padded pair count [1] int32), where
    ``max_tiles = cdiv(num_pairs, block_m) + min(num_experts, num_pairs)``. Device ops
    of static shapes (no host sync), about a dozen launches."""
    flat = topk_ids.reshape(-1).long()
    num_pairs, device = flat.numel(), flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    first_pair = counts.cumsum(0) - counts  # of each expert, in expert order
    order = torch.argsort(flat, stable=True)  # pair ids grouped by expert
    expert = flat[order]
    rank = torch.arange(num_pairs, device=device) - first_pair[expert]
    slots = padded_end[expert] - padded[expert] + rank
    tiles = -(-num_pairs // block_m) + min(num_experts, num_pairs)
    sorted_pairs = torch.full((tiles * block_m,), num_pairs, dtype=torch.int32, device=device)
    sorted_pairs.scatter_(0, slots, order.to(torch.int32))
    tile_starts = torch.arange(tiles, device=device) * block_m
    tile_expert = torch.searchsorted(padded_end, tile_starts, right=True)
    tile_expert = tile_expert.clamp_(max=num_experts - 1).to(torch.int32)  # (tiles past the end)
    return sorted_pairs, tile_expert, padded_end[-1:].to(torch.int32)
