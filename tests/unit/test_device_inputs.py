"""DeviceInputs: a step's inputs packed into one buffer, at addresses fixed by the step's row
counts (what CUDA graphs replay from), every field rewritten by each step that uses it."""

import pytest
import torch

from tests.unit.test_input_batch import new, step
from vllm_runner.engine.outputs import CachedRequestData
from vllm_runner.worker.device_inputs import DeviceInputs
from vllm_runner.worker.input_batch import InputBatch


def _decode_step(batch: InputBatch, prompts: dict[str, list[int]]):
    for r in prompts:
        batch.states[r].token_ids.append(100 + len(r))
    sched = step(cached=[CachedRequestData(r, [], len(t)) for r, t in prompts.items()],
                 scheduled=dict.fromkeys(prompts, 1))  # fmt: skip
    batch.update(sched)
    return batch.prepare(sched)


def _prefill(batch: InputBatch, prompts: dict[str, list[int]], blocks: dict[str, list[int]]):
    sched = step([new(r, t, blocks[r]) for r, t in prompts.items()],
                 scheduled={r: len(t) for r, t in prompts.items()})  # fmt: skip
    batch.update(sched)
    return batch.prepare(sched)


def test_graph_sized_step_reads_the_views_a_graph_captured():
    """A decode step padded to a bucket returns views at the addresses ``views(size, size)``
    gives (the graph's static inputs), holding the step's values and inert padding, even
    after a prefill step of another layout wrote over the same bytes."""
    buffers = DeviceInputs(64, 8, 4, torch.device("cpu"))
    buffers.arena.fill_(0xAB)  # bytes no step wrote
    static = buffers.views(4, 4)
    batch = InputBatch(block_size=4, max_blocks_per_request=4)
    prompts = {"a": [1, 2], "b": [3, 4, 5, 6, 7], "c": [8, 9, 10]}
    buffers.load(_prefill(batch, prompts, {"a": [1], "b": [2, 3], "c": [4]}))
    ids, pos, md, _ = buffers.load(_decode_step(batch, prompts), pad_reqs=4)
    assert ids.data_ptr() == static["input_ids"].data_ptr() and len(ids) == 4
    assert pos.data_ptr() == static["positions"].data_ptr()
    for name in ("slot_mapping", "block_tables", "seq_lens", "query_start_loc", "decode_order"):
        assert getattr(md, name).data_ptr() == static[name].data_ptr(), name
    assert static["input_ids"].tolist() == [101, 101, 101, 0]
    assert static["positions"].tolist() == [2, 5, 3, 0]
    assert static["slot_mapping"].tolist() == [6, 13, 19, -1]  # padding writes nothing
    assert static["seq_lens"].tolist() == [3, 6, 4, 0]  # and reads nothing
    assert static["query_start_loc"].tolist() == [0, 1, 2, 3, 3]
    assert static["decode_order"].tolist() == [1, 2, 0, 3]  # longest context first
    # the step's table is 2 blocks wide; the rest of its rows and the padding row are zeros
    assert static["block_tables"].tolist() == [[1, 0, 0, 0], [2, 3, 0, 0], [4, 0, 0, 0], [0] * 4]


def test_piecewise_step_pads_its_input_ids_alone():
    """A step padded to a piecewise graph's token count: its input ids sit where
    ``token_ids(size)`` points for any request count, padded with id 0; every other field
    is the step's own, unpadded (attention reads only the step's tokens)."""
    buffers = DeviceInputs(64, 8, 4, torch.device("cpu"))
    buffers.arena.fill_(0xAB)
    batch = InputBatch(block_size=4, max_blocks_per_request=4)
    prompts = {"a": [1, 2], "b": [3, 4, 5, 6, 7]}
    ids, pos, md, _ = buffers.load(_prefill(batch, prompts, {"a": [1], "b": [2, 3]}), pad_tokens=12)
    assert (
        ids.data_ptr()
        == buffers.token_ids(12).data_ptr()
        == buffers.views(12, 5)["input_ids"].data_ptr()
    )
    assert ids.tolist() == [1, 2, 3, 4, 5, 6, 7, 0, 0, 0, 0, 0]
    assert pos.tolist() == [0, 1, 0, 1, 2, 3, 4]
    assert md.slot_mapping.tolist() == [4, 5, 8, 9, 10, 11, 12]
    assert md.query_start_loc.tolist() == [0, 2, 7] and md.seq_lens.tolist() == [2, 5]
    assert md.prefill_query_start_loc is None  # no decode rows: the kernels take it whole


def test_mixed_step_passes_its_prefill_rows_query_start_loc():
    """Decode rows ahead of a prompt: the prefill rows' query_start_loc, computed once a
    step for every layer's attention."""
    buffers = DeviceInputs(64, 8, 4, torch.device("cpu"))
    batch = InputBatch(block_size=4, max_blocks_per_request=4)
    prompts = {"a": [1, 2], "b": [3, 4, 5]}
    buffers.load(_prefill(batch, prompts, {"a": [1], "b": [2]}))
    for r in prompts:
        batch.states[r].token_ids.append(9)
    sched = step([new("c", [6, 7, 8, 9, 10], [3, 4])],
                 cached=[CachedRequestData(r, [], len(t)) for r, t in prompts.items()],
                 scheduled={"a": 1, "b": 1, "c": 5})  # fmt: skip
    batch.update(sched)
    _, _, md, _ = buffers.load(batch.prepare(sched))
    assert md.num_decode_rows == 2 and md.query_start_loc.tolist() == [0, 1, 2, 7]
    assert md.prefill_query_start_loc.tolist() == [0, 5]


def test_fields_are_aligned_and_disjoint():
    """Every field starts 16-byte aligned and no two fields of one layout overlap."""
    buffers = DeviceInputs(64, 8, 5, torch.device("cpu"))
    for tokens, reqs in [(1, 1), (3, 3), (64, 8), (17, 5)]:
        spans = sorted(
            (v.data_ptr(), v.data_ptr() + v.numel() * v.element_size())
            for v in buffers.views(tokens, reqs).values()
        )
        assert all(start % 16 == 0 for start, _ in spans)
        assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:], strict=False))


def test_sampled_tokens_patched_from_the_device():
    """Input tokens still on the device (async scheduling) are copied from the previous
    step's sampled ids, whose row indices travel in the same packed buffer."""
    buffers = DeviceInputs(64, 8, 4, torch.device("cpu"))
    batch = InputBatch(block_size=4, max_blocks_per_request=4)
    prompts = {"a": [1, 2], "b": [3, 4, 5]}
    buffers.load(_prefill(batch, prompts, {"a": [1], "b": [2]}))
    for r in prompts:
        batch.states[r].num_pending += 1  # sampled on the device, not yet on the host
    sched = step(cached=[CachedRequestData(r, [], len(t)) for r, t in prompts.items()],
                 scheduled=dict.fromkeys(prompts, 1))  # fmt: skip
    batch.update(sched)
    inputs = batch.prepare(sched)
    assert len(inputs.missing) == 2
    prev = torch.tensor([70, 80])  # rows of the previous step's sampled ids
    ids, *_ = buffers.load(inputs, 0, prev, {"a": 1, "b": 0})
    assert ids.tolist() == [80, 70]


@pytest.mark.gpu
def test_a_host_buffer_is_not_staged_again_before_its_copy_ran():
    """Three steps staged while the stream is still busy (a long prefill ahead of them) and
    none of them sampling, so nothing else waits: the third reuses the first's host buffer,
    and must not overwrite it before the first's copy has run."""
    if not torch.cuda.is_available():
        pytest.fail("the gpu suite needs a CUDA device")
    buffers = DeviceInputs(64, 8, 4, torch.device("cuda"))
    batch = InputBatch(block_size=4, max_blocks_per_request=4)
    torch.cuda.synchronize()
    torch.cuda._sleep(500_000_000)  # (~0.25 s of the stream's time: the copies queue behind)
    seen = []
    for k in (1, 2, 3):
        tokens = [10 * k + 1, 10 * k + 2, 10 * k + 3]
        ids, *_ = buffers.load(_prefill(batch, {f"r{k}": tokens}, {f"r{k}": [k]}))
        seen.append(ids.clone())  # (in stream order: right after this step's copy)
    torch.cuda.synchronize()
    assert [s.tolist() for s in seen] == [[11, 12, 13], [21, 22, 23], [31, 32, 33]]
