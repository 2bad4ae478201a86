"""The runner's persistent per-request state and the flat per-step input arrays."""

from dataclasses import dataclass, field

import numpy as np
import torch

from vllm_runner.engine.outputs import SchedulerOutput
from vllm_runner.lora.request import LoRARequest
from vllm_runner.pooling_params import PoolingParams
from vllm_runner.sample.rows import SamplingRow
from vllm_runner.sampling_params import SamplingParams


@dataclass(kw_only=True)
class CachedRequestState(SamplingRow):
    """A request's state in the runner; also its row for the sampler, which reads its
    params, token_ids (prompt + sampled so far), num_prompt_tokens, seed and num_pending
    (sampled on the device, not yet appended to token_ids)."""

    request_id: str
    row: int  # this request's row of InputBatch.block_table
    num_blocks: int
    num_computed_tokens: int = 0
    prompt_logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_ranks: list[int] = field(default_factory=list)  # (of each prompt_logprobs entry)
    # an embedding request's settings, and the sum of the hidden states it pooled so far
    # (over ``pooled_count`` positions; worker/pooling.py)
    pooling: PoolingParams | None = None
    pooled_sum: torch.Tensor | None = None  # [hidden] fp32
    pooled_count: int = 0
    lora_request: LoRARequest | None = None  # the adapter it runs with


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
    # One query each and no request in its first step: only a first step can hit a prefix
    # block that another request's token fills in the same step, so the decode kernel may
    # write this step's keys / values itself (no request reads a slot another one writes).
    fused_decode: bool
    lora_slots: np.ndarray | None = None  # [num_tokens] int64: each token's LoRA slot (-1: none)


class InputBatch:
    """Keeps each scheduled request's tokens and blocks between steps, so a step's scheduler
    output carries only what changed. Block ids live in one persistent table, a row per
    request: a step gathers its rows with one numpy index instead of copying Python lists."""

    def __init__(self, block_size: int, max_blocks_per_request: int, rows: int = 64) -> None:
        self.block_size = block_size
        self.states: dict[str, CachedRequestState] = {}
        self.block_table = np.zeros((rows, max_blocks_per_request), np.int32)
        self.free_rows = list(range(rows - 1, -1, -1))
        # Requests the sampler must see row by row (anything but plain greedy).
        self.needs_rows: set[str] = set()
        self.pooling_ids: set[str] = set()  # embedding requests: pooled, never sampled

    def release(self, request_ids: set[str]) -> None:
        """Forget finished requests: their token lists, rows and block-table entries."""
        for request_id in request_ids:
            state = self.states.pop(request_id, None)
            if state is not None:  # a reused row must not show its last owner's blocks
                self.block_table[state.row, : state.num_blocks] = 0
                self.free_rows.append(state.row)
            self.needs_rows.discard(request_id)
            self.pooling_ids.discard(request_id)

    def update(self, sched: SchedulerOutput) -> None:
        self.release(sched.finished_req_ids)
        for new in sched.new_requests:
            if not _plain_greedy(new.params):
                self.needs_rows.add(new.request_id)
            state = CachedRequestState(
                new.params,
                list(new.token_ids),
                new.num_prompt_tokens,
                new.seed,
                request_id=new.request_id,
                row=self._take_row(),
                num_blocks=0,
                num_computed_tokens=new.num_computed_tokens,
                pooling=new.pooling,
                lora_request=new.lora_request,
            )
            if new.pooling is not None:
                self.pooling_ids.add(new.request_id)
            self.states[new.request_id] = state
            self._append_blocks(state, new.block_ids)
        for cached in sched.cached_requests:
            state = self.states[cached.request_id]
            if cached.new_block_ids:
                self._append_blocks(state, cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    def _take_row(self) -> int:
        if not self.free_rows:  # more live requests than rows: double the table
            rows = self.block_table.shape[0]
            self.block_table = np.concatenate([self.block_table, np.zeros_like(self.block_table)])
            self.free_rows = list(range(2 * rows - 1, rows - 1, -1))
        return self.free_rows.pop()

    def _append_blocks(self, state: CachedRequestState, block_ids: list[int]) -> None:
        n = state.num_blocks
        self.block_table[state.row, n : n + len(block_ids)] = block_ids
        state.num_blocks = n + len(block_ids)

    def prepare(self, sched: SchedulerOutput) -> StepInputs:
        bs = self.block_size
        states = self.states
        request_ids = list(sched.num_scheduled_tokens)
        counts = list(sched.num_scheduled_tokens.values())
        num_reqs = len(request_ids)
        total = sum(counts)
        starts, rows = [0] * num_reqs, [0] * num_reqs
        input_ids = np.empty(total, np.int64)
        sampling_ids, sampled_rows, missing = [], [], []
        q0 = 0
        for i, request_id in enumerate(request_ids):
            state = states[request_id]
            lo, count = state.num_computed_tokens, counts[i]
            hi = lo + count
            starts[i], rows[i] = lo, state.row
            tokens = state.token_ids
            known = len(tokens)
            if hi > known:  # the last input token was sampled last step, still on the device
                missing.append((q0 + known - lo, request_id))
                input_ids[q0 + known - lo] = 0
                if known > lo:
                    input_ids[q0 : q0 + known - lo] = tokens[lo:known]
            elif count == 1:
                input_ids[q0] = tokens[lo]
            else:
                input_ids[q0 : q0 + count] = tokens[lo:hi]
            if hi == known + state.num_pending and state.pooling is None:
                sampling_ids.append(request_id)
                sampled_rows.append(i)
            q0 += count
        counts_np = np.array(counts, np.int64)
        starts_np = np.array(starts, np.int64)
        seq_lens = starts_np + counts_np
        query_start_loc = np.zeros(num_reqs + 1, np.int32)
        np.cumsum(counts_np, out=query_start_loc[1:])
        # position of every flat token: its request's start + offset within the request
        req_of_token = np.repeat(np.arange(num_reqs), counts_np)
        positions = (
            np.arange(total, dtype=np.int64)
            - query_start_loc[req_of_token]
            + starts_np[req_of_token]
        )
        max_blocks = int((seq_lens.max() + bs - 1) // bs) if num_reqs else 0
        block_tables = self.block_table[np.array(rows, np.int64), :max_blocks]
        slot_mapping = (
            block_tables[req_of_token, positions // bs].astype(np.int64) * bs + positions % bs
        )
        logits_indices = query_start_loc[1:][sampled_rows].astype(np.int64) - 1
        not_decode = counts_np != 1
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
            max(counts) if num_reqs else 0,
            int(seq_lens.max()) if num_reqs else 0,
            int(np.argmax(not_decode)) if not_decode.any() else num_reqs,
            max(counts, default=0) == 1 and not sched.new_requests,
        )


def _plain_greedy(params: SamplingParams) -> bool:
    return (
        params.greedy
        and not params.has_penalties
        and params.min_tokens == 0
        and params.logprobs is None
        and not params.logit_bias
        and not params.allowed_token_ids
        and not params.bad_words_token_ids
        and not params.guided_choice_token_ids
        and not params.json_object
        and not params.guided_pattern
        and not params.guided_grammar
    )
