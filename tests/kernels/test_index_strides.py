"""The launchers read their per-token / per-request index tensors (positions, slot_mapping,
a decode order) one element per program at stride 1. A strided view of one (e.g. a column
of a [tokens, 2] table) would read the wrong elements, and past the end of the view's
storage: each launcher refuses it, as they refuse strided seq_lens / query_start_loc."""

import pytest
import torch
from kernel_testing import int32, make_paged_kv

from kernels.kv_cache import rotary_and_write_kv_cache, write_kv_cache
from kernels.paged_attention import NewTokens, paged_attention_decode
from kernels.rotary import rotary_embedding


def _column(values: list[int], device: torch.device, filler: int = 0,
            dtype: torch.dtype = torch.int64) -> torch.Tensor:  # fmt: skip
    """``values`` as column 0 of a [n, 2] table (stride 2); column 1 is ``filler``, in
    range, so that a kernel reading the table at stride 1 computes garbage instead of
    faulting."""
    return torch.tensor([[v, filler] for v in values], dtype=dtype, device=device)[:, 0]


def _cos_sin(device: torch.device) -> torch.Tensor:
    angles = torch.rand(64, 32, device=device) * 6.0
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def test_rotary_refuses_strided_positions(device: torch.device) -> None:
    q, k = torch.randn(3, 4, 64, device=device), torch.randn(3, 2, 64, device=device)
    with pytest.raises(AssertionError, match="positions .* must be a contiguous"):
        rotary_embedding(_column([3, 7, 1], device), q, k, _cos_sin(device))


def test_write_kv_cache_refuses_strided_slots(device: torch.device) -> None:
    cache, key = torch.zeros(4, 16, 2, 64, device=device), torch.randn(3, 2, 64, device=device)
    with pytest.raises(AssertionError, match="slot_mapping .* must be a contiguous"):
        write_kv_cache(key, key, cache, cache.clone(), _column([5, 9, 40], device))


@pytest.mark.parametrize("strided", ["positions", "slot_mapping"])
def test_rotary_write_refuses_strided_indices(device: torch.device, strided: str) -> None:
    q, k = torch.randn(3, 4, 64, device=device), torch.randn(3, 2, 64, device=device)
    cache = torch.zeros(4, 16, 2, 64, device=device)
    index = {"positions": [3, 7, 1], "slot_mapping": [5, 9, 40]}
    args = {name: torch.tensor(v, device=device) for name, v in index.items()}
    args[strided] = _column(index[strided], device)
    with pytest.raises(AssertionError, match="must be contiguous"):
        rotary_and_write_kv_cache(args["positions"], q, k, k, _cos_sin(device), cache,
                                  cache.clone(), args["slot_mapping"])  # fmt: skip


@pytest.mark.parametrize("strided", ["positions", "slot_mapping", "order"])
def test_decode_refuses_strided_indices(device: torch.device, strided: str) -> None:
    seq_lens = [3, 20, 9]
    k_cache, v_cache, block_tables = make_paged_kv(seq_lens, 2, 64, 16, torch.float32, device)
    query = torch.randn(3, 4, 64, device=device)
    key = torch.randn(3, 2, 64, device=device)
    # the new token's slot: its position in its request's last block
    slots = [
        int(block_tables[r, (s - 1) // 16]) * 16 + (s - 1) % 16 for r, s in enumerate(seq_lens)
    ]
    index = {"positions": [s - 1 for s in seq_lens], "slot_mapping": slots, "order": [1, 2, 0]}
    args = {name: torch.tensor(v, device=device) for name, v in index.items()}
    args["order"] = args["order"].to(torch.int32)
    # filler 1: a strided order read at stride 1 is [1, 1, 2], no permutation
    args[strided] = _column(index[strided], device, 1, args[strided].dtype)
    new = NewTokens(args["positions"], key, key.clone(), _cos_sin(device), args["slot_mapping"])
    with pytest.raises(AssertionError, match="contiguous"):
        paged_attention_decode(query, k_cache, v_cache, block_tables, int32(seq_lens, device),
                               0.125, new_tokens=new, order=args["order"])  # fmt: skip
