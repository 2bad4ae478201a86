"""Embedding requests in the model runner: which rows of a step's final hidden states each
one pools, the running sums that carry a pooled vector across prompt chunks, and the copy of
finished vectors to the host.

Every pooling type is a sum over chosen prompt positions divided by their count: LAST the
last prompt token, CLS the first, MEAN every one. A chunked prompt adds each chunk's rows to
its request's sum, so a vector never needs more than one chunk's hidden states at a time; it
is finished (divided, maybe L2-normalised) in the step that computes the last chunk.
Preempted requests restart from their first token (the runner drops their state), and MEAN /
CLS requests never start from prefix-cache hits (``Request.reads_prefix_cache``), so every
position they pool is computed by one of their own steps.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vllm_runner.worker.input_batch import CachedRequestState, StepInputs


@dataclass
class PoolingPlan:
    """The rows a step pools, per request that pools any: flat row range ``[lo, hi)`` of
    the step's hidden states, and whether the step computes its last prompt chunk."""

    request_ids: list[str]
    rows: list[tuple[int, int]]
    last_chunk: list[bool]


@dataclass
class PooledVectors:
    """A step's finished vectors on their way to the host: ``host`` [num_requests, hidden]
    fp32 (pinned on CUDA) holds them once ``event`` completes (None: copied already)."""

    request_ids: list[str]
    host: torch.Tensor
    event: torch.cuda.Event | None

    def read(self) -> dict[str, list[float]]:
        if self.event is not None:
            self.event.synchronize()
        return dict(zip(self.request_ids, self.host.tolist(), strict=True))


def plan(states: dict[str, CachedRequestState], pooling_ids: set[str], inputs: StepInputs):
    """The step's PoolingPlan, or None when it pools nothing (the common generation step
    costs one set test). ``pooling_ids``: the embedding requests the runner holds."""
    if not pooling_ids or pooling_ids.isdisjoint(inputs.request_ids):
        return None
    pooled = PoolingPlan([], [], [])
    for i, request_id in enumerate(inputs.request_ids):
        if request_id not in pooling_ids:
            continue
        state = states[request_id]
        lo, hi = int(inputs.query_start_loc[i]), int(inputs.query_start_loc[i + 1])
        end = int(inputs.seq_lens[i])  # positions [end - (hi - lo), end) run this step
        last = end == state.num_prompt_tokens
        kind = state.pooling.pooling_type
        if kind == "MEAN":
            rows = (lo, hi)
        elif kind == "CLS":
            rows = (lo, lo + 1) if end - (hi - lo) == 0 else (lo, lo)
        else:  # LAST
            rows = (hi - 1, hi) if last else (lo, lo)
        if rows[0] < rows[1] or last:
            pooled.request_ids.append(request_id)
            pooled.rows.append(rows)
            pooled.last_chunk.append(last)
    return pooled if pooled.request_ids else None


def pool(
    pooled: PoolingPlan,
    states: dict[str, CachedRequestState],
    hidden: torch.Tensor,  # [num_tokens (+ padding), hidden]: every token of the step
) -> PooledVectors | None:
    """Add the step's rows to each request's sum; the vectors of requests whose prompt
    ends here, finished and copied to the host (asynchronously on CUDA)."""
    ids, vectors = [], []
    for request_id, (lo, hi), last in zip(
        pooled.request_ids, pooled.rows, pooled.last_chunk, strict=True
    ):
        state = states[request_id]
        if hi > lo:  # fp32 sums: a long MEAN prompt adds thousands of rows
            part = hidden[lo:hi].sum(dim=0, dtype=torch.float32)
            state.pooled_sum = part if state.pooled_sum is None else state.pooled_sum + part
            state.pooled_count += hi - lo
        if last:
            vector = state.pooled_sum / state.pooled_count  # [hidden]
            if state.pooling.normalize:
                vector = F.normalize(vector, dim=-1)
            ids.append(request_id)
            vectors.append(vector)
    if not ids:
        return None
    stacked = torch.stack(vectors)  # [num_finished, hidden] fp32
    if stacked.device.type != "cuda":
        return PooledVectors(ids, stacked, None)
    host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
    host.copy_(stacked, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return PooledVectors(ids, host, event)
