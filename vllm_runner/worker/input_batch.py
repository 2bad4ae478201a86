"""The runner's persistent per-request state and the flat per-step input arrays."""

from dataclasses import dataclass, field

import numpy as np

from vllm_runner.engine.outputs import SchedulerOutput
from vllm_runner.sampling_params import SamplingParams


@dataclass
class CachedRequestState:
    request_id: str
    token_ids: list[int]  # prompt + sampled so far
    num_prompt_tokens: int
    params: SamplingParams
    block_ids: list[int]
    seed: int | None
    num_computed_tokens: int = 0
    num_pending: int = 0  # sampled on the device, not yet appended to token_ids
    prompt_logprobs: list[float | None] = field(default_factory=list)


@dataclass
class StepInputs:
    """Flat host arrays for one step (no padding between requests)."""

    request_ids: list[str]
    input_ids: np.ndarray  # [num_tokens] int64
    positions: np.ndarray  # [num_tokens] int64
    slot_mapping: np.ndarray  # [num_tokens] int64
    block_tables: np.ndarray  # [num_reqs, max_blocks] int32
    seq_lens: np.ndarray  # [num_reqs] int32
    query_start_loc: np.ndarray  # [num_reqs + 1] int32
    logits_indices: np.ndarray  # [num_sampled] int64: last token of each sampling request
    sampling_ids: list[str]  # requests that sample this step, in logits order
    # Tokens whose value is still on the device (sampled last step): flat index -> request.
    missing: list[tuple[int, str]]
    max_query_len: int
    max_seq_len: int
    num_decode_rows: int  # leading requests with exactly one query token


class InputBatch:
    """Keeps each scheduled request's tokens and blocks between steps, so a step's scheduler
    output carries only what changed."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.states: dict[str, CachedRequestState] = {}

    def update(self, sched: SchedulerOutput) -> None:
        for request_id in sched.finished_req_ids:
            self.states.pop(request_id, None)
        for new in sched.new_requests:
            self.states[new.request_id] = CachedRequestState(
                new.request_id,
                list(new.token_ids),
                new.num_prompt_tokens,
                new.params,
                list(new.block_ids),
                new.seed,
                new.num_computed_tokens,
            )
        for cached in sched.cached_requests:
            state = self.states[cached.request_id]
            state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    def prepare(self, sched: SchedulerOutput) -> StepInputs:
        bs = self.block_size
        request_ids = list(sched.num_scheduled_tokens)
        num_reqs = len(request_ids)
        counts = np.fromiter(sched.num_scheduled_tokens.values(), np.int64, num_reqs)
        starts = np.fromiter(
            (self.states[r].num_computed_tokens for r in request_ids), np.int64, num_reqs
        )
        seq_lens = starts + counts
        query_start_loc = np.zeros(num_reqs + 1, np.int32)
        np.cumsum(counts, out=query_start_loc[1:])
        total = int(query_start_loc[-1])
        # position of every flat token: its request's start + offset within the request
        req_of_token = np.repeat(np.arange(num_reqs), counts)
        positions = (
            np.arange(total, dtype=np.int64) - query_start_loc[req_of_token] + starts[req_of_token]
        )

        max_blocks = int((seq_lens.max() + bs - 1) // bs) if num_reqs else 0
        block_tables = np.zeros((num_reqs, max_blocks), np.int32)
        input_ids = np.empty(total, np.int64)
        sampling_ids, sampled_rows, missing = [], [], []
        for i, request_id in enumerate(request_ids):
            state = self.states[request_id]
            blocks = state.block_ids
            block_tables[i, : len(blocks)] = blocks[:max_blocks]
            lo, hi = int(starts[i]), int(seq_lens[i])
            q0 = int(query_start_loc[i])
            known = len(state.token_ids)
            if hi > known:  # the last input token was sampled last step, still on the device
                missing.append((q0 + known - lo, request_id))
                input_ids[q0 + known - lo] = 0
                hi_known = known
            else:
                hi_known = hi
            input_ids[q0 : q0 + hi_known - lo] = state.token_ids[lo:hi_known]
            if hi == known + state.num_pending:
                sampling_ids.append(request_id)
                sampled_rows.append(i)
        slot_mapping = (
            block_tables[req_of_token, positions // bs].astype(np.int64) * bs + positions % bs
        )
        logits_indices = query_start_loc[1:][sampled_rows].astype(np.int64) - 1
        return StepInputs(
            request_ids,
            input_ids,
            positions,
            slot_mapping,
            block_tables,
            seq_lens.astype(np.int32),
            query_start_loc,
            logits_indices,
            sampling_ids,
            missing,
            int(counts.max()) if num_reqs else 0,
            int(seq_lens.max()) if num_reqs else 0,
            int(np.argmax(counts != 1)) if (counts != 1).any() else num_reqs,
        )
