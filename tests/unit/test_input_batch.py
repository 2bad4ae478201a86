"""The runner's persistent input batch: block-table rows, flat step arrays."""

import numpy as np

from vllm_runner.engine.outputs import CachedRequestData, NewRequestData, SchedulerOutput
from vllm_runner.sampling_params import SamplingParams
from vllm_runner.worker.input_batch import InputBatch


def new(rid: str, tokens: list[int], blocks: list[int], computed: int = 0) -> NewRequestData:
    return NewRequestData(rid, tokens, len(tokens), SamplingParams(), blocks, computed, None)


def step(new_reqs=(), cached=(), scheduled=None, finished=()) -> SchedulerOutput:
    scheduled = scheduled or {}
    return SchedulerOutput(
        list(new_reqs), list(cached), scheduled, sum(scheduled.values()), set(finished)
    )


def test_prefill_then_decode_arrays_are_exact():
    batch = InputBatch(block_size=4, max_blocks_per_request=8)
    sched = step([new("a", [10, 11, 12, 13, 14], [7, 3]), new("b", [20, 21], [5])],
                 scheduled={"a": 5, "b": 2})  # fmt: skip
    batch.update(sched)
    x = batch.prepare(sched)
    assert x.input_ids.tolist() == [10, 11, 12, 13, 14, 20, 21]
    assert x.positions.tolist() == [0, 1, 2, 3, 4, 0, 1]
    # token t of a request sits in block_table[t // 4] at offset t % 4
    assert x.slot_mapping.tolist() == [28, 29, 30, 31, 12, 20, 21]
    assert x.block_tables.tolist() == [[7, 3], [5, 0]]
    assert x.seq_lens.tolist() == [5, 2] and x.query_start_loc.tolist() == [0, 5, 7]
    assert x.logits_indices.tolist() == [4, 6] and x.sampling_ids == ["a", "b"]
    assert x.num_decode_rows == 0 and x.max_query_len == 5 and x.max_seq_len == 5
    assert not x.fused_decode

    batch.states["a"].token_ids.append(15)  # the runner appends each sampled token
    batch.states["b"].token_ids.append(22)
    sched = step(cached=[CachedRequestData("a", [], 5), CachedRequestData("b", [], 2)],
                 scheduled={"a": 1, "b": 1})  # fmt: skip
    batch.update(sched)
    x = batch.prepare(sched)
    assert x.input_ids.tolist() == [15, 22] and x.positions.tolist() == [5, 2]
    assert x.slot_mapping.tolist() == [13, 22] and x.num_decode_rows == 2
    assert x.fused_decode  # one query each, both requests ran before


def test_a_first_step_with_one_query_is_not_a_fused_decode():
    """A new request whose prompt is cached but for its last token has one query, like the
    decode rows beside it; its cache hits may include a block that a decode row's token
    fills in this very step, so the step keeps the KV write ahead of attention."""
    batch = InputBatch(block_size=4, max_blocks_per_request=8)
    sched = step([new("a", [10, 11, 12], [7])], scheduled={"a": 3})
    batch.update(sched)
    batch.prepare(sched)
    batch.states["a"].token_ids.append(13)
    sched = step([new("c", [10, 11, 12, 13, 14], [7, 2], computed=4)],
                 [CachedRequestData("a", [], 3)], {"a": 1, "c": 1})  # fmt: skip
    batch.update(sched)
    x = batch.prepare(sched)
    assert x.max_query_len == 1 and x.num_decode_rows == 2
    assert not x.fused_decode


def test_rows_are_reused_and_the_table_grows():
    batch = InputBatch(block_size=4, max_blocks_per_request=3, rows=2)
    reqs = [new(f"r{i}", [i + 1], [i]) for i in range(5)]
    sched = step(reqs, scheduled={r.request_id: 1 for r in reqs})
    batch.update(sched)
    rows = [batch.states[f"r{i}"].row for i in range(5)]
    assert sorted(rows) == [0, 1, 2, 3, 4] and batch.block_table.shape == (8, 3)
    assert batch.prepare(sched).block_tables[:, 0].tolist() == [0, 1, 2, 3, 4]
    # r1 finishes; r9 takes its row, with its own blocks, then gets one more block
    freed = batch.states["r1"].row
    sched = step([new("r9", [9, 9, 9, 9, 9], [40, 41])], scheduled={"r9": 5}, finished={"r1"})
    batch.update(sched)
    assert batch.states["r9"].row == freed and "r1" not in batch.states
    batch.update(step(cached=[CachedRequestData("r9", [42], 5)], scheduled={"r9": 1}))
    assert batch.block_table[freed].tolist() == [40, 41, 42]
    # a finished request's row is cleared before anyone reuses it
    batch.update(step([new("r8", [8], [50])], scheduled={"r8": 1}, finished={"r9"}))
    assert batch.block_table[batch.states["r8"].row].tolist() == [50, 0, 0]
    assert np.count_nonzero(batch.block_table[:, 0]) == 4  # r0 holds block 0


def test_device_inputs_order_decode_rows_longest_first():
    """The decode rows go to the decode kernel longest context first (ties in row order),
    graph padding rows (seq_len 0) after them; a step with fewer than two has no order."""
    import torch

    from vllm_runner.worker.device_inputs import DeviceInputs

    batch = InputBatch(block_size=4, max_blocks_per_request=8)
    prompts = {"c": [8], "a": [1, 2], "b": [3, 4, 5, 6, 7], "d": [9, 10, 11, 12, 13]}
    blocks = {"c": [4], "a": [1], "b": [2, 3], "d": [5, 6]}
    sched = step([new(r, t, blocks[r]) for r, t in prompts.items()],
                 scheduled={r: len(t) for r, t in prompts.items()})  # fmt: skip
    batch.update(sched)
    buffers = DeviceInputs(64, 8, 8, torch.device("cpu"))
    _, _, md, _ = buffers.load(batch.prepare(sched))
    assert md.num_decode_rows == 1 and md.decode_order is None  # c: one query, no order
    for r in prompts:
        batch.states[r].token_ids.append(100)
    sched = step(cached=[CachedRequestData(r, [], len(t)) for r, t in prompts.items()],
                 scheduled=dict.fromkeys(prompts, 1))  # fmt: skip
    batch.update(sched)
    inputs = batch.prepare(sched)
    assert inputs.seq_lens.tolist() == [2, 3, 6, 6]
    _, _, md, _ = buffers.load(inputs)
    assert md.decode_order.dtype == torch.int32 and md.decode_order.tolist() == [2, 3, 1, 0]
    _, _, md, _ = buffers.load(inputs, pad_reqs=6)
    assert md.decode_order.tolist() == [2, 3, 1, 0, 4, 5]
    sched = step([new("e", [1, 2, 3], [7])], scheduled={"e": 3})
    batch.update(sched)
    _, _, md, _ = buffers.load(batch.prepare(sched))
    assert md.num_decode_rows == 0 and md.decode_order is None


def test_device_inputs_order_mixed_step_covers_decode_rows_only():
    """Two decode rows ahead of a prefill chunk: the order has exactly those two rows, longest
    first, and is a permutation of them (the decode kernel indexes only rows < d)."""
    import torch

    from vllm_runner.worker.device_inputs import DeviceInputs

    batch = InputBatch(block_size=4, max_blocks_per_request=8)
    prompts = {"a": [1, 2], "b": [3, 4, 5, 6, 7]}
    sched = step([new(r, t, [i + 1, i + 3]) for i, (r, t) in enumerate(prompts.items())],
                 scheduled={r: len(t) for r, t in prompts.items()})  # fmt: skip
    batch.update(sched)
    batch.prepare(sched)
    for r in prompts:
        batch.states[r].token_ids.append(100)
    sched = step([new("c", [9, 9, 9], [7])],
                 cached=[CachedRequestData(r, [], len(t)) for r, t in prompts.items()],
                 scheduled={"a": 1, "b": 1, "c": 3})  # fmt: skip
    batch.update(sched)
    inputs = batch.prepare(sched)
    assert inputs.num_decode_rows == 2 and inputs.seq_lens.tolist() == [3, 6, 3]
    _, _, md, _ = DeviceInputs(64, 8, 8, torch.device("cpu")).load(inputs)
    assert md.decode_order.tolist() == [1, 0]


def test_only_plain_greedy_requests_skip_the_per_row_sampler():
    """A greedy request with min_tokens, logprobs, a logit bias, allowed ids or a penalty
    needs its row in the sampler (the all-greedy fast path takes a bare argmax, which would
    end a min_tokens request at EOS); a finished request leaves the set."""
    kinds = {
        "plain": SamplingParams(temperature=0.0),
        "min": SamplingParams(temperature=0.0, min_tokens=2),
        "lp": SamplingParams(temperature=0.0, logprobs=1),
        "bias": SamplingParams(temperature=0.0, logit_bias={3: 1.0}),
        "allowed": SamplingParams(temperature=0.0, allowed_token_ids=[3, 4]),
        "penalty": SamplingParams(temperature=0.0, repetition_penalty=1.2),
        "sampled": SamplingParams(temperature=1.0),
    }
    reqs = [NewRequestData(r, [1, 2], 2, p, [i], 0, None) for i, (r, p) in enumerate(kinds.items())]
    batch = InputBatch(block_size=4, max_blocks_per_request=2)
    batch.update(step(reqs, scheduled=dict.fromkeys(kinds, 2)))
    assert batch.needs_rows == {"min", "lp", "bias", "allowed", "penalty", "sampled"}
    batch.update(step(finished={"min", "lp", "plain"}))
    assert batch.needs_rows == {"bias", "allowed", "penalty", "sampled"}
