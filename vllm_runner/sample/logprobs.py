"""Logprobs of sampled tokens: on the device each row's chosen token and top-N, then the
per-row (logprob, {token id: logprob}) the outputs carry; an overlapped step's are copied
to pinned memory with its sampled ids and read a step later."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vllm_runner.sample.rows import SamplingRow


def logprob_tensors(
    raw: torch.Tensor, rows: list[SamplingRow], sampled: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """On the device: each row's sampled-token logprob [rows] and the top-N logprobs and
    ids [rows, N] (N the largest any row asks, at least 1) of the raw ``log_softmax``."""
    n_max = max(r.params.logprobs or 0 for r in rows)
    top_vals, top_ids = raw.topk(max(n_max, 1), dim=-1)
    return raw.gather(1, sampled[:, None])[:, 0], top_vals, top_ids


@dataclass
class PendingLogprobs:
    """An overlapped step's logprobs: ``logprob_tensors``' values being copied to the host
    with the sampled ids; ``entries`` reads them once the ids are there. NOTE: ``rows`` are
    the runner's request states, which change by then: only their params are read."""

    rows: list[SamplingRow]
    host: list[torch.Tensor]

    @classmethod
    def copy(cls, raw: torch.Tensor, rows: list[SamplingRow], sampled: torch.Tensor):
        pin = raw.device.type == "cuda"  # (on CPU the copy is synchronous)
        host = [
            torch.empty(v.shape, dtype=v.dtype, pin_memory=pin).copy_(v, non_blocking=pin)
            for v in logprob_tensors(raw, rows, sampled)
        ]
        return cls(rows, host)

    def entries(self, ids: list[int]) -> list[tuple[float, dict[int, float]] | None]:
        return logprob_entries(self.rows, ids, *(v.tolist() for v in self.host))


def logprob_entries(
    rows: list[SamplingRow],
    ids: list[int],
    chosen: list[float],
    top_vals: list[list[float]],
    top_ids: list[list[int]],
) -> list[tuple[float, dict[int, float]] | None]:
    """Per row, from ``logprob_tensors``' values on the host: (the sampled token's logprob,
    {token id: logprob}), or None for a row that asks for none."""
    out = []
    for i, row in enumerate(rows):
        n = row.params.logprobs
        if n is None:
            out.append(None)
            continue
        # as vLLM: the sampled token first (always listed), then the top n by rank
        top = {ids[i]: chosen[i]}
        top.update(zip(top_ids[i][:n], top_vals[i][:n], strict=True))
        out.append((chosen[i], top))
    return out
