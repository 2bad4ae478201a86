"""LoRA's pieces without a model: the scheduler's max_loras rule, the per-token slots in the
step inputs (padding -1), and the dense slot-masked term against a per-token loop."""

import dataclasses

import numpy as np
import torch

from tests.unit.test_device_inputs import _prefill
from tests.unit.test_scheduler import make_request, make_scheduler
from vllm_runner.engine.outputs import SchedulerOutput
from vllm_runner.lora.layers import LoRALayer, LoRASlots
from vllm_runner.lora.request import LoRARequest
from vllm_runner.model.layers.linear import QKVParallelLinear
from vllm_runner.worker.device_inputs import DeviceInputs
from vllm_runner.worker.input_batch import InputBatch


def test_a_step_admits_at_most_max_loras_adapters_and_the_rest_wait_in_order():
    s = make_scheduler()
    s.config = dataclasses.replace(s.config, max_loras=1)
    a, b = LoRARequest("a", 1, "/a"), LoRARequest("b", 2, "/b")
    for rid, lora in zip("abcde", [a, b, a, None, b], strict=True):
        request = make_request(rid, 4)
        request.lora_request = lora
        s.add_request(request)
    out: SchedulerOutput = s.schedule()
    assert list(out.num_scheduled_tokens) == ["a", "c", "d"]  # b and e wait for adapter a
    assert [r.request_id for r in s.waiting] == ["b", "e"]
    for rid in "acd":
        s.finish_request(rid, s.requests[rid].status.FINISHED_STOPPED)
    assert list(s.schedule().num_scheduled_tokens) == ["b", "e"]


def test_each_token_gets_its_requests_slot_and_padding_none():
    slots = torch.full((16,), 7, dtype=torch.int64)
    buffers = DeviceInputs(16, 4, 4, torch.device("cpu"), lora_slots=slots)
    batch = InputBatch(4, 4)
    inputs = _prefill(batch, {"x": [1, 2, 3], "y": [4, 5]}, {"x": [0], "y": [1]})
    inputs.lora_slots = np.array([1, 1, 1, -1, -1])
    buffers.load(inputs, pad_tokens=8)
    assert slots.tolist() == [1, 1, 1, -1, -1, -1, -1, -1] + [7] * 8
    plain = DeviceInputs(16, 4, 4, torch.device("cpu"))  # (no LoRA: the layout of before)
    assert "lora_slots" not in plain.views(8, 2)


def test_the_masked_term_equals_each_tokens_own_adapter():
    torch.manual_seed(0)
    layer = QKVParallelLinear(8, 2, 2, 1)  # q 4, k 2, v 2 outputs
    slots = LoRASlots(5, torch.device("cpu"))
    lora = LoRALayer(layer, [(0, 4), (4, 2), (6, 2)], slots, max_loras=2, max_rank=3,
                     dtype=torch.float32)  # fmt: skip
    weights = {}
    for slot, part, rank in [(0, 0, 2), (0, 2, 3), (1, 1, 1)]:
        size = lora.slices[part][1]
        a, b = torch.randn(rank, 8), torch.randn(rank, size)
        lora.set(slot, part, a, b)
        weights[slot, part] = (a, b)
    slots.tokens.copy_(torch.tensor([0, 1, -1, 1, 0]))
    x, y = torch.randn(5, 8), torch.randn(5, 8)
    want = y.clone()
    for t, slot in enumerate([0, 1, -1, 1, 0]):
        for (s, part), (a, b) in weights.items():
            if s == slot:
                offset, size = lora.slices[part]
                want[t, offset : offset + size] += x[t] @ a.T @ b
    torch.testing.assert_close(lora.apply(x, y.clone()), want)
