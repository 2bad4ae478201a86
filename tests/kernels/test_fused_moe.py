"""Fused MoE grouped GEMM (kernels/fused_moe.py) vs the torch reference: small shapes in the
interpreter, Mixtral-8x7B / Qwen3-30B-A3B layer shapes on a GPU (-m gpu)."""

import pytest
import torch

from kernels import reference
from kernels.fused_moe import MoeTiles, choose_tiles, fused_moe, gated_pass_shared_bytes


def _moe_inputs(
    num_tokens: int, hidden: int, inter: int, num_experts: int, top_k: int,
    dtype: torch.dtype, device: torch.device,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """x ~ N(0, 1) and weights of std 1 / sqrt(fan-in) (outputs of order 1), the routing of
    random router logits (renormalized)."""
    x = torch.randn(num_tokens, hidden, device=device).to(dtype)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, device=device) / hidden**0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, device=device) / inter**0.5).to(dtype)
    logits = torch.randn(num_tokens, num_experts, device=device)
    weights, ids = reference.moe_route(logits, top_k, renormalize=True)
    return x, w13, w2, weights, ids


def _reference(x, w13, w2, weights, ids, dtype=torch.float64) -> torch.Tensor:
    """The reference on upcast copies (exact for lower-precision inputs)."""
    return reference.fused_moe(x.to(dtype), w13.to(dtype), w2.to(dtype), weights.to(dtype), ids)


@pytest.mark.parametrize(
    "num_tokens, num_experts, top_k",
    [(1, 4, 2), (5, 4, 2), (37, 8, 3), (20, 16, 4)],
)
def test_fused_moe_matches_reference_fp32(device, num_tokens, num_experts, top_k) -> None:
    """fp32 (ieee dots) against the fp64 reference; inter 48 is a partial N tile."""
    inputs = _moe_inputs(num_tokens, 32, 48, num_experts, top_k, torch.float32, device)
    out = fused_moe(*inputs)
    assert out.dtype == torch.float32 and out.shape == (num_tokens, 32)
    torch.testing.assert_close(out.double(), _reference(*inputs), atol=1e-5, rtol=1e-5)


def test_fused_moe_bf16_matches_reference(device: torch.device) -> None:
    inputs = _moe_inputs(9, 64, 40, 4, 2, torch.bfloat16, device)
    out = fused_moe(*inputs)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), _reference(*inputs), atol=3e-2, rtol=3e-2)


def test_skewed_routing_and_tile_sizes(device: torch.device) -> None:
    """Every token on the same two experts (one expert's run spans several M tiles, the
    other experts have none), at each tile size and grouping of the programs (4 and 3 M tiles
    a group: the 11 tiles' last group short, though past the padded count; the next test
    puts real tiles there): the reference's output."""
    x, w13, w2, weights, _ = _moe_inputs(21, 32, 48, 8, 2, torch.float32, device)
    ids = torch.tensor([[5, 1]] * 21, device=device)
    want = _reference(x, w13, w2, weights, ids)
    for tiles in (MoeTiles(16, 16, 16), MoeTiles(32, 32, 32), MoeTiles(16, 64, 32),
                  MoeTiles(16, 16, 16, group_m=4), MoeTiles(16, 32, 16, group_m=3)):  # fmt: skip
        out = fused_moe(x, w13, w2, weights, ids, tiles)
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("group_m", [1, 2, 3, 5, 6, 7, 16])
def test_program_groups_cover_ragged_tile_counts(device: torch.device, group_m: int) -> None:
    """68 pairs, 17 on each of 4 experts, 16-row tiles: the grid's bound is cdiv(68, 16) + 4
    = 9 M tiles and 8 hold pairs, so the last group of programs (2 .. 9 M tiles: short for
    every group_m here but 1 and 3, and a single one for 16) holds real tiles; 3 N tiles of
    inter 48, 2 of hidden 32. A (M tile, N tile) no program maps to stays NaN (the conftest
    poisons the buffers): the reference's output."""
    x, w13, w2, weights, _ = _moe_inputs(34, 32, 48, 4, 2, torch.float32, device)
    ids = (torch.arange(68, device=device) % 4).view(34, 2)  # tokens on experts 0, 1 or 2, 3
    out = fused_moe(x, w13, w2, weights, ids, MoeTiles(16, 16, 16, group_m=group_m))
    torch.testing.assert_close(out.double(), _reference(x, w13, w2, weights, ids),
                               atol=1e-5, rtol=1e-5)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prefill_tiles_with_grouped_programs(device: torch.device, dtype: torch.dtype) -> None:
    """33 pairs an expert: choose_tiles' prefill tiles (fp32 64 x 64, bf16 128 x 128, programs
    grouped 8 M tiles deep) over a grid of fewer M tiles than a group (7 and 6, 4 of them
    holding pairs), N of 2-3 tiles (hidden 160, inter 96): the reference's output."""
    x, w13, w2, weights, _ = _moe_inputs(66, 160, 96, 4, 2, dtype, device)
    ids = (torch.arange(132, device=device) % 4).view(66, 2)
    tiles = choose_tiles(132, 4, dtype)
    assert tiles.group_m == 8 and tiles.block_m == (64 if dtype == torch.float32 else 128)
    out = fused_moe(x, w13, w2, weights, ids)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), _reference(x, w13, w2, weights, ids),
                               atol=tol, rtol=tol)  # fmt: skip


def test_choose_tiles_by_pairs_per_expert() -> None:
    """16-row tiles under 16 pairs an expert (decode), 32 up to 32, then 128 x 128 at eight
    warps with the programs grouped 8 M tiles deep (64 x 64 for fp32), 16 deep from 2,048
    pairs an expert."""
    assert choose_tiles(16 * 2, 8, torch.bfloat16) == MoeTiles(16, 64, 64, num_warps=4)
    assert choose_tiles(256 * 8, 128, torch.bfloat16) == MoeTiles(32, 64, 64, num_warps=4)
    assert choose_tiles(256 * 2, 8, torch.bfloat16) == MoeTiles(128, 128, 64, 8, group_m=8)
    assert choose_tiles(256 * 2, 8, torch.float32) == MoeTiles(64, 64, 32, 8, group_m=8)
    assert choose_tiles(2047 * 8, 8, torch.bfloat16).group_m == 8
    assert choose_tiles(16384 * 2, 8, torch.bfloat16) == MoeTiles(128, 128, 64, 8, group_m=16)


def test_prefill_tiles_fit_the_cards_shared_memory() -> None:
    """Cards with less shared memory than an H100's 227 KiB take fewer stages or smaller
    tiles: an A100's 163 KiB the 144 KiB of three 128 x 128 stages; RTX 30 / 40, A10, L4,
    L40S (99 KiB) two stages (96 KiB); less, 64 x 64 tiles (72 KiB at three stages)."""

    def tiles(shared: int, dtype: torch.dtype = torch.bfloat16) -> MoeTiles:
        return choose_tiles(256 * 2, 8, dtype, shared)

    assert tiles(166_912) == MoeTiles(128, 128, 64, 8, 3, group_m=8)
    assert tiles(101_376) == MoeTiles(128, 128, 64, 8, 2, group_m=8)
    assert tiles(98_303) == MoeTiles(64, 64, 64, 8, 3, group_m=8)
    assert tiles(49_152) == MoeTiles(64, 64, 64, 8, 2, group_m=8)
    assert tiles(101_376, torch.float32) == MoeTiles(64, 64, 32, 8, 3, group_m=8)
    for shared in (166_912, 101_376, 98_303, 49_152):
        assert gated_pass_shared_bytes(tiles(shared), torch.bfloat16) <= shared
    # decode's tiles fit in 64 KiB (any card with bf16 has more)
    decode = choose_tiles(16 * 2, 8, torch.bfloat16, 49_152)
    assert gated_pass_shared_bytes(decode, torch.bfloat16) <= 65_536


def test_no_tokens(device: torch.device) -> None:
    x, w13, w2, weights, ids = _moe_inputs(0, 32, 48, 4, 2, torch.float32, device)
    assert fused_moe(x, w13, w2, weights, ids).shape == (0, 32)


def test_launcher_checks_shapes(device: torch.device) -> None:
    x, w13, w2, weights, ids = _moe_inputs(3, 32, 48, 4, 2, torch.float32, device)
    with pytest.raises(AssertionError, match=r"w2 \(4, 32, 40\) must be \(4, 32, 48\)"):
        fused_moe(x, w13, w2[..., :40], weights, ids)
    with pytest.raises(AssertionError, match="topk_weights torch.float16"):
        fused_moe(x, w13, w2, weights.half(), ids)


# ---- GPU: the served models' layer shapes ----------------------------------------------------
SHAPES = {  # hidden, inter, experts, top_k
    "mixtral-8x7b": (4096, 14336, 8, 2),
    "qwen3-30b-a3b": (2048, 768, 128, 8),
}


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 16, 256, 4096])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_fused_moe_model_shapes_bf16(device, shape, num_tokens) -> None:
    hidden, inter, num_experts, top_k = SHAPES[shape]
    inputs = _moe_inputs(num_tokens, hidden, inter, num_experts, top_k, torch.bfloat16, device)
    out = fused_moe(*inputs)
    want = _reference(*inputs, dtype=torch.float32)
    # bf16: each gate / up / act / output rounds once (2^-8 relative), outputs of order 1
    torch.testing.assert_close(out.float(), want, atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", list(SHAPES))
def test_fused_moe_replays_in_a_cuda_graph(device, shape) -> None:
    """Captured once with one routing, replayed with others (new ids and weights copied into
    the static inputs): each replay gives the eager launch's output exactly."""
    hidden, inter, num_experts, top_k = SHAPES[shape]
    x, w13, w2, weights, ids = _moe_inputs(16, hidden, inter, num_experts, top_k,
                                           torch.bfloat16, device)  # fmt: skip
    fused_moe(x, w13, w2, weights, ids)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, w13, w2, weights, ids)
    for seed in range(3):
        torch.manual_seed(seed)
        x.copy_(torch.randn_like(x))
        logits = torch.randn(16, num_experts, device=device)
        if seed == 2:  # every token on experts 0 and 1: the most tiles
            logits[:, :2] += 100
        new_weights, new_ids = reference.moe_route(logits, top_k, renormalize=True)
        weights.copy_(new_weights)
        ids.copy_(new_ids)
        graph.replay()
        torch.testing.assert_close(out, fused_moe(x, w13, w2, weights, ids), atol=0, rtol=0)
