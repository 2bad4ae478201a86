"""The MoE routing step (kernels/moe_align.py) against its torch reference: exact outputs (the
kernel keeps the reference's stable pair order), small routings in the interpreter, the
served models' routings and a CUDA-graph replay on a GPU (-m gpu)."""

import pytest
import torch

from kernels import moe_align, reference
from kernels.fused_moe import choose_tiles
from kernels.moe_align import CHUNK, MAX_EXPERTS, align_pairs, max_tiles

UNWRITTEN = -7


@pytest.fixture(autouse=True)
def _poison_int_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Integer outputs start as UNWRITTEN (conftest poisons float ones only): an element the
    kernels never write fails the exact comparison instead of matching stale memory."""
    empty = torch.empty

    def poisoned(*args, **kwargs) -> torch.Tensor:  # noqa: ANN002, ANN003
        t = empty(*args, **kwargs)
        return t if t.is_floating_point() else t.fill_(UNWRITTEN)

    monkeypatch.setattr(torch, "empty", poisoned)


def _routing(num_tokens: int, num_experts: int, top_k: int, device: torch.device) -> torch.Tensor:
    """Distinct experts per token (as a router's top-k gives), uniformly random."""
    return torch.rand(num_tokens, num_experts, device=device).topk(top_k, dim=-1).indices


def _assert_matches_reference(ids: torch.Tensor, num_experts: int, block_m: int, **kw) -> None:
    got = align_pairs(ids, num_experts, block_m, **kw)
    want = reference.align_pairs(ids, num_experts, block_m)
    num_pairs = ids.numel()
    assert got[0].shape == (max_tiles(num_pairs, num_experts, block_m) * block_m,)
    for name, g, w in zip(("sorted_pairs", "tile_expert", "num_padded"), got, want, strict=True):
        assert g.dtype == torch.int32, name
        assert torch.equal(g, w), f"{name}: {g.tolist()} != {w.tolist()}"


def test_groups_pairs_by_expert_in_padded_tiles(device: torch.device) -> None:
    """Pairs 0..7 of 4 tokens x top-2, experts 2, 0 | 2, 3 | 0, 2 | 3, 2 (expert 1 unused):
    tiles of 4 rows hold expert 0's pairs (1, 4), expert 2's (0, 2, 5, 7), expert 3's (3, 6),
    padding = 8; the grid's bound is cdiv(8, 4) + min(4, 8) = 6 tiles, 3 of them past the
    padded count (12) and given the last expert."""
    ids = torch.tensor([[2, 0], [2, 3], [0, 2], [3, 2]], device=device)
    assert max_tiles(8, 4, 4) == 6
    pad = 8
    for sorted_pairs, tile_expert, num_padded in (
        align_pairs(ids, num_experts=4, block_m=4),
        reference.align_pairs(ids, num_experts=4, block_m=4),
    ):
        assert sorted_pairs.tolist() == [1, 4, pad, pad, 0, 2, 5, 7, 3, 6, pad, pad] + [pad] * 12
        assert tile_expert.tolist() == [0, 2, 3, 3, 3, 3]
        assert num_padded.tolist() == [12]


@pytest.mark.parametrize(
    "num_tokens, num_experts, top_k, block_m",
    [
        (1, 8, 2, 16), (1, 128, 8, 16), (3, 60, 1, 32), (5, 60, 8, 64), (37, 8, 2, 16),
        (37, 128, 8, 32), (19, 60, 4, 64), (64, 8, 8, 64), (30, 256, 8, 32),
    ],
)  # fmt: skip
@pytest.mark.parametrize("chunk", [CHUNK, 32], ids=["one-launch", "chunks"])
def test_random_routings_match_reference(
    device, num_tokens, num_experts, top_k, block_m, chunk
) -> None:
    """One chunk (decode's single launch) and chunks of 32 pairs (the count launch, then
    programs that sum the counts table): the reference's outputs exactly."""
    ids = _routing(num_tokens, num_experts, top_k, device)
    _assert_matches_reference(ids, num_experts, block_m, chunk=chunk)


@pytest.mark.parametrize("chunk", [CHUNK, 16])
@pytest.mark.parametrize("block_m", [16, 32, 64])
def test_skewed_routings(device: torch.device, block_m: int, chunk: int) -> None:
    """Every pair on one expert (its run spans tiles and chunks, 59 experts have none, 45
    pairs: no multiple of a tile); all on the last expert; all on expert 0; a token's experts
    crowded at both ends of 128."""
    for ids, num_experts in (
        (torch.full((45, 1), 17, device=device), 60),
        (torch.full((23, 2), 59, device=device), 60),
        (torch.zeros(30, 1, dtype=torch.int64, device=device), 8),
        (torch.tensor([[0, 1, 126, 127]] * 9, device=device), 128),
    ):
        _assert_matches_reference(ids, num_experts, block_m, chunk=chunk)


def test_int32_ids_and_no_pairs(device: torch.device) -> None:
    ids = _routing(7, 60, 4, device)
    _assert_matches_reference(ids.int(), 60, 16)
    empty = torch.empty(0, 8, dtype=torch.int64, device=device)
    sorted_pairs, tile_expert, num_padded = align_pairs(empty, 128, 16)
    assert sorted_pairs.numel() == tile_expert.numel() == 0 and num_padded.tolist() == [0]


@pytest.mark.parametrize("num_pairs", [CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 1])
def test_one_launch_up_to_a_chunk_then_two(
    device: torch.device, monkeypatch: pytest.MonkeyPatch, num_pairs: int
) -> None:
    """At the default chunk: the count launch runs from CHUNK + 1 pairs on (one chunk for
    CHUNK: a single launch), and either way the outputs are the reference's, random and
    all on one expert."""
    launches = []
    count_kernel = moe_align._expert_count_kernel

    class _Counted:
        def __getitem__(self, grid: tuple[int]):  # noqa: ANN204
            launches.append(grid)
            return count_kernel[grid]

    monkeypatch.setattr(moe_align, "_expert_count_kernel", _Counted())
    random_ids = torch.randint(0, 60, (num_pairs, 1), device=device)
    for ids in (random_ids, torch.full((num_pairs, 1), 59, device=device)):
        _assert_matches_reference(ids, 60, 16)
    chunks = -(-num_pairs // CHUNK)
    assert launches == ([] if chunks == 1 else [(chunks,)] * 2)


@pytest.mark.parametrize("num_experts", [MAX_EXPERTS, 1000])
def test_many_experts(device: torch.device, num_experts: int) -> None:
    """The most experts the launcher takes, and a count short of a power of 2 (tiles past
    the padded count: the last real expert): one launch and several chunks, no pairs."""
    ids = _routing(300, num_experts, 8, device)
    _assert_matches_reference(ids, num_experts, 16)
    _assert_matches_reference(ids[:8], num_experts, 32)
    _assert_matches_reference(ids[:1, :4].repeat(70, 1), num_experts, 16)  # 4 experts' runs
    empty = ids[:0]
    for chunk in (CHUNK, 16):
        sorted_pairs, tile_expert, num_padded = align_pairs(empty, num_experts, 16, chunk)
        assert sorted_pairs.numel() == tile_expert.numel() == 0 and num_padded.tolist() == [0]


def test_launcher_checks(device: torch.device) -> None:
    ids = _routing(3, 8, 2, device)
    with pytest.raises(AssertionError, match=f"2000 experts: 1 to {MAX_EXPERTS}"):
        align_pairs(ids, 2000, 16)
    with pytest.raises(AssertionError, match="block_m 24: a power of 2"):
        align_pairs(ids, 8, 24)
    with pytest.raises(AssertionError, match="topk_ids torch.float32"):
        align_pairs(ids.float(), 8, 16)


# ---- GPU: the served models' routings ----------------------------------------------------------
ROUTINGS = {"mixtral-8x7b": (8, 2), "qwen3-30b-a3b": (128, 8)}  # experts, top_k


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 16, 256, 4096, 16384])
@pytest.mark.parametrize("model", list(ROUTINGS))
def test_model_routings_match_reference(device, model, num_tokens) -> None:
    """At fused_moe's own tile size, and at each other one; random and all-on-one-expert."""
    num_experts, top_k = ROUTINGS[model]
    ids = _routing(num_tokens, num_experts, top_k, device)
    chosen = choose_tiles(ids.numel(), num_experts, torch.bfloat16).block_m
    for block_m in sorted({chosen, 16, 32, 64, 128}):
        _assert_matches_reference(ids, num_experts, block_m)
    skewed = torch.arange(top_k, device=device).repeat(num_tokens, 1)
    _assert_matches_reference(skewed, num_experts, chosen)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [16, 512])
def test_replays_in_a_cuda_graph(device: torch.device, num_tokens: int) -> None:
    """Captured with one routing (one launch at 16 tokens x 8, two at 512), replayed with
    new ids copied into the static input: the reference's outputs for each."""
    ids = _routing(num_tokens, 128, 8, device)
    align_pairs(ids, 128, 16)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = align_pairs(ids, 128, 16)
    for seed in range(3):
        torch.manual_seed(seed)
        new = _routing(num_tokens, 128, 8, device)
        if seed == 2:  # every token on experts 0..7: the most tiles
            new = torch.arange(8, device=device).repeat(num_tokens, 1)
        ids.copy_(new)
        graph.replay()
        for got, want in zip(outs, reference.align_pairs(ids, 128, 16), strict=True):
            assert torch.equal(got, want)
