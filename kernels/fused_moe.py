"""Fused mixture-of-experts MLP (Triton): ``sum_k w_k * down_e(silu(gate_e(x)) * up_e(x))``.

Token-expert pairs (``num_pairs = num_tokens * top_k``) are sorted by expert and each
expert's run padded to a multiple of BLOCK_M (``kernels.moe_align.align_pairs``, one launch
at decode), so that an M tile holds the pairs of one expert. One kernel is a grouped GEMM
over those tiles: a program computes one (M tile, N tile) of ``rows @ w[expert].T``. It runs
twice: over ``w13`` (gate and up accumulated side by side, SiLU-mul in the epilogue) into a
[num_pairs, inter] buffer, then over ``w2`` with the routing weight in the epilogue into
[num_pairs, hidden]; the top-k outputs of a token are summed last (in order: deterministic).

NOTE: CUDA-graph safe: the sort and the padding are launches of static shapes (no host
sync), the grid is sized from the upper bound of M tiles, ``cdiv(num_pairs, BLOCK_M) +
min(num_experts, num_pairs)`` (one partial tile per expert that has pairs), and the
programs of tiles past the device-side padded count return at once.
"""

import dataclasses

import torch
import triton
import triton.language as tl

from kernels.attention_tile import dot_precision
from kernels.launch import H100_SHARED_BYTES, cdiv, shared_memory_bytes
from kernels.moe_align import align_pairs


@triton.jit(do_not_specialize=["num_pairs"])  # the token count changes every step
def _fused_moe_kernel(
    a_ptr,  # [rows, K]: pair p reads row p // A_ROW_DIV (x: top_k; activations: 1)
    w_ptr,  # [num_experts, N or 2 * N (GATED: gate rows, then up rows), K]
    out_ptr,  # [num_pairs, N]
    weights_ptr,  # [num_pairs] fp32 routing weights (MUL_WEIGHT only)
    sorted_pairs_ptr,  # [max_tiles * BLOCK_M] int32: pairs by expert, padding = num_pairs
    tile_expert_ptr,  # [max_tiles] int32: the expert of each M tile
    num_padded_ptr,  # [1] int32: pairs after padding (tiles at or past it exit)
    num_pairs,
    N,
    K,
    stride_am,
    stride_ak,
    stride_we,
    stride_wn,
    stride_wk,
    stride_om,
    stride_on,
    A_ROW_DIV: tl.constexpr,
    GATED: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # programs in groups of GROUP_M M tiles, down the M tiles first: a weight tile is read by
    # the group's M tiles (one expert's, mostly) while it is in L2 (GROUP_M 1: N first)
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = pid // in_group * GROUP_M
    group_rows = tl.minimum(tl.num_programs(0) // num_n - first_m, GROUP_M)
    pid_m = first_m + pid % in_group % group_rows
    pid_n = pid % in_group // group_rows
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert = tl.load(tile_expert_ptr + pid_m).to(tl.int64)
    pairs = tl.load(sorted_pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pairs < num_pairs
    rows = (pairs // A_ROW_DIV).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    # [BLOCK_K, BLOCK_N] tiles of w[expert].T
    w_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & n_ok[None, :]
        acc = tl.dot(a, tl.load(w_ptrs, mask=w_mask, other=0.0), acc,
                     input_precision=DOT_PRECISION)  # fmt: skip
        if GATED:
            up = tl.load(w_ptrs + N * stride_wn, mask=w_mask, other=0.0)
            acc_up = tl.dot(a, up, acc_up, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    if GATED:
        acc = acc * tl.sigmoid(acc) * acc_up
    if MUL_WEIGHT:
        acc = acc * tl.load(weights_ptr + pairs, mask=valid, other=0.0)[:, None]
    out_ptrs = out_ptr + pairs[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


@dataclasses.dataclass(frozen=True)
class MoeTiles:
    """Tile sizes and launch settings of the grouped GEMM (one set for both passes)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 1  # M tiles a program group walks before the next N tile


def gated_pass_shared_bytes(tiles: MoeTiles, dtype: torch.dtype) -> int:
    """Shared memory of the gate / up pass (the larger of the two): each pipeline stage holds
    an M tile of rows and two weight tiles. Triton's own figure at the 128 x 128 tiles (the
    sm_90 compile test checks it); an upper bound at others, where it may keep fewer stages."""
    return tiles.num_stages * (tiles.block_m + 2 * tiles.block_n) * tiles.block_k * dtype.itemsize


def choose_tiles(
    num_pairs: int, num_experts: int, dtype: torch.dtype, shared_bytes: int = H100_SHARED_BYTES
) -> MoeTiles:
    """M tiles about the size of an expert's share of the pairs (decode: 16, most of each
    tile padding otherwise), 128 x 128 at eight warps once experts hold 32+ pairs, their
    programs grouped 8 M tiles deep (an expert's weight tiles are read once into L2 for the
    group); a function of shapes and the card only, so a CUDA graph's launch is fixed. From an
    H200 sweep (``benchmarks/moe_probe.py --sweep``, bf16, us): Mixtral 256 / 1,024 / 4,096
    tokens 758 / 1,764 / 5,973 at 128 x 128 against 1,504 / 2,837 / 11,202 at the 32-64 x 64
    tiles before; Qwen3-30B-A3B 317 / 393 / 818 against 370 / 491 / 953. The 128 x 128 tiles'
    three stages take 144 KiB of shared memory: cards with less (``shared_bytes``: RTX 30 /
    40, A10, L4, L40S have 99 KiB) get two stages, or 64 x 64 tiles (fp32: 64 x 64 always).
    From 2,048 pairs an expert, groups of 16 M tiles (Mixtral 16,384 tokens: 22.3 vs 24.7 ms,
    groups of 4 23.0); four stages or K tiles of 32 / 128 won nowhere, groups of 4 / 16 by a
    run's noise elsewhere (H200, ``moe_probe.py``'s shapes, one run each)."""
    per_expert = num_pairs / num_experts
    block_k = 32 if dtype == torch.float32 else 64
    if per_expert < 16:
        return MoeTiles(16, 64, block_k, num_warps=4)
    if per_expert <= 32:
        return MoeTiles(32, 64, block_k, num_warps=4)
    sizes = [(64, 64)] if dtype == torch.float32 else [(128, 128), (64, 64)]
    group_m = 16 if per_expert >= 2048 else 8
    options = [MoeTiles(bm, bn, block_k, 8, stages, group_m)
               for bm, bn in sizes for stages in (3, 2)]  # fmt: skip
    fits = [t for t in options if gated_pass_shared_bytes(t, dtype) <= shared_bytes]
    return fits[0] if fits else options[-1]


def _grouped_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    weights: torch.Tensor | None,
    aligned: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    row_div: int,
    gated: bool,
    tiles: MoeTiles,
) -> None:
    sorted_pairs, tile_expert, num_padded = aligned
    num_pairs, n = out.shape
    grid = (tile_expert.numel() * cdiv(n, tiles.block_n),)
    _fused_moe_kernel[grid](
        a, w, out, weights if weights is not None else out, sorted_pairs, tile_expert,
        num_padded, num_pairs, n, a.shape[1], a.stride(0), a.stride(1), w.stride(0),
        w.stride(1), w.stride(2), out.stride(0), out.stride(1),
        A_ROW_DIV=row_div, GATED=gated, MUL_WEIGHT=weights is not None,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        GROUP_M=tiles.group_m, DOT_PRECISION=dot_precision(a.dtype), num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )  # fmt: skip


def fused_moe(
    x: torch.Tensor,  # [num_tokens, hidden]
    w13: torch.Tensor,  # [num_experts, 2 * inter, hidden]: gate rows, then up rows
    w2: torch.Tensor,  # [num_experts, hidden, inter]
    topk_weights: torch.Tensor,  # [num_tokens, top_k] fp32
    topk_ids: torch.Tensor,  # [num_tokens, top_k] int32 / int64, each < num_experts
    tiles: MoeTiles | None = None,
) -> torch.Tensor:  # [num_tokens, hidden] in x's dtype
    """``kernels.reference.fused_moe`` in two grouped-GEMM launches (module docstring)."""
    num_tokens, hidden = x.shape
    num_experts, two_inter, w13_hidden = w13.shape
    inter = two_inter // 2
    assert w13_hidden == hidden and two_inter == 2 * inter, (
        f"w13 {tuple(w13.shape)} must be [experts, 2 * inter, {hidden}]"
    )
    assert tuple(w2.shape) == (num_experts, hidden, inter), (
        f"w2 {tuple(w2.shape)} must be {(num_experts, hidden, inter)}"
    )
    assert x.dtype == w13.dtype == w2.dtype, f"x {x.dtype}, w13 {w13.dtype}, w2 {w2.dtype}"
    assert topk_ids.shape == topk_weights.shape and topk_ids.shape[0] == num_tokens, (
        f"topk_ids {tuple(topk_ids.shape)}, topk_weights {tuple(topk_weights.shape)}, "
        f"{num_tokens} tokens"
    )
    assert topk_weights.dtype == torch.float32, f"topk_weights {topk_weights.dtype}"
    assert x.stride(1) == 1 and w13.stride(2) == 1 and w2.stride(2) == 1, "dense last dims"
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    if num_pairs == 0:
        return x.new_zeros(num_tokens, hidden)
    tiles = tiles or choose_tiles(num_pairs, num_experts, x.dtype, shared_memory_bytes(x.device))
    aligned = align_pairs(topk_ids, num_experts, tiles.block_m)
    act = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    _grouped_gemm(x, w13, act, None, aligned, top_k, True, tiles)
    pair_out = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)
    weights = topk_weights.reshape(-1).contiguous()
    _grouped_gemm(act, w2, pair_out, weights, aligned, 1, False, tiles)
    return pair_out.view(num_tokens, top_k, hidden).sum(dim=1)
