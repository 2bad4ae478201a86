"""Weight offloading's execution path on a toy model (CPU, no engine): the plan against the
placed model, the packed host / working-buffer layout, the copies a forward issues, and the
start-up check's arithmetic (the CUDA memory query faked)."""

import copy

import pytest
import torch
from torch import nn

from vllm_runner.model.layers.linear import LinearBase, RowParallelLinear
from vllm_runner.model.layers.quant import Fp8W8A8, Int8WeightOnly
from vllm_runner.worker import memory
from vllm_runner.worker.memory import GiB
from vllm_runner.worker.offload import (
    ALIGN,
    WeightPlan,
    check_weights_fit,
    decoder_layers,
    place_weights,
    plan_weights,
    weight_bytes,
)


class Block(nn.Module):
    """Two linear layers with a residual; ``odd`` gives the first a shape fp8 cannot take."""

    def __init__(self, hidden: int, odd: bool) -> None:
        super().__init__()
        inner = 40 if odd else 48  # 40 % 16 != 0
        self.up = RowParallelLinear(hidden, inner, bias=True)
        self.down = RowParallelLinear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.tanh(self.up(x)))


class Toy(nn.Module):
    def __init__(self, num_layers: int = 4, hidden: int = 32) -> None:
        super().__init__()
        self.proj_in = LinearBase(hidden, hidden, bias=False)  # outside the decoder stack
        self.layers = nn.ModuleList(Block(hidden, odd=i % 2 == 1) for i in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj_in.matmul(x, None)
        for layer in self.layers:
            x = layer(x)
        return x


def toy(num_layers: int = 4, seed: int = 0) -> Toy:
    torch.manual_seed(seed)
    model = Toy(num_layers)
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    return model


def placed(model: Toy, method, cpu_offload_gb: float):
    plan = plan_weights(model, method, cpu_offload_gb)
    model.weight_offloader = place_weights(model, torch.device("cpu"), method, plan)
    return plan, model.weight_offloader


@pytest.mark.parametrize("method_cls", [None, Int8WeightOnly, Fp8W8A8])
def test_the_plan_is_what_placement_makes(method_cls):
    """Planned totals and per-layer packed bytes equal those of the placed model, with fp8
    leaving the odd shapes (40 rows / columns) in fp32; every layer offloaded."""
    method = method_cls() if method_cls else None
    resident = toy()
    plan = plan_weights(resident, method, 0.0)
    place_weights(resident, torch.device("cpu"), method, plan)
    assert plan.total_bytes == sum(p.nbytes for p in resident.parameters())
    if method is not None:  # the linear layer outside the stack is quantized too
        assert resident.proj_in.weight.dtype == method.weight_dtype
    fp8 = method_cls is Fp8W8A8
    assert resident.layers[1].up.quant_method is (None if fp8 else method)
    model = toy()
    plan, offloader = placed(model, method, 1.0)
    assert plan.offload_layers == (0, 1, 2, 3)
    assert [h.numel() for h in offloader.host] == list(plan.layer_bytes)
    assert offloader.buffers[0].numel() == max(plan.layer_bytes)
    assert weight_bytes(model)["weight_bytes_offloaded"] == plan.offloaded_bytes


def test_offloaded_parameters_are_aligned_views_into_their_slot():
    model = toy()
    _, offloader = placed(model, Int8WeightOnly(), 1.0)
    for j, layer in enumerate(decoder_layers(model)):
        slot = offloader.buffers[j % 2]
        offsets = [
            p.data_ptr() - slot.data_ptr() for m in (layer.up, layer.down) for p in m.parameters()
        ]
        # up: int8 weight [48 or 40, 32] (6 or 5 blocks of 256 B), fp32 bias and scales
        # (192 or 160 B: one block each); down: int8 weight [32, 48 or 40], fp32 scales
        w = 6 if j % 2 == 0 else 5
        assert offsets == [0, w * ALIGN, (w + 1) * ALIGN, (w + 2) * ALIGN, (2 * w + 2) * ALIGN]
        assert offloader.host[j].numel() == (2 * w + 3) * ALIGN


@pytest.mark.parametrize("method_cls", [None, Int8WeightOnly, Fp8W8A8])
def test_offloaded_forward_equals_resident_and_copies_each_layer_once(method_cls):
    resident = toy()
    model = copy.deepcopy(resident)
    method = method_cls() if method_cls else None
    place_weights(resident, torch.device("cpu"), method, plan_weights(resident, method, 0.0))
    _, offloader = placed(model, method, 1.0)
    x = torch.randn(5, 32)
    for step in range(3):
        torch.testing.assert_close(model(x), resident(x), rtol=0, atol=0)
        # layer 0 once at the first forward, then 1, 2, 3 and (from the last layer) the
        # next step's 0: four copies a forward
        assert offloader.copies == 1 + 4 * (step + 1)
        assert offloader.owner == [0, 3]


def test_one_offloaded_layer_has_one_working_buffer():
    model = toy(num_layers=1)
    plan, offloader = placed(model, None, 1.0)
    assert plan.offload_layers == (0,) and offloader.num_slots == 1
    assert offloader.buffer_bytes == plan.buffer_bytes == plan.layer_bytes[0]
    assert plan.resident_bytes == plan.floor_bytes == plan.total_bytes
    x = torch.randn(2, 32)
    model(x)
    model(x)
    assert offloader.copies == 1  # the slot keeps its only layer


def test_plans_without_decoder_layers():
    assert WeightPlan(100, (), (), 0).floor_bytes == 100
    module = nn.Module()
    module.proj = LinearBase(8, 8, bias=False)
    assert plan_weights(module, None, 0.0).layer_bytes == ()
    with pytest.raises(ValueError) as e:
        plan_weights(module, None, 0.5)
    assert str(e.value) == "Module has no ModuleList named 'layers' to offload"


def test_what_int8_would_save_never_goes_negative():
    model = nn.Module()
    model.thin = LinearBase(2, 8, bias=False).half()  # 32 B; int8: 16 B + 32 B of scales
    model.wide = LinearBase(64, 32, bias=False).half()  # 4096 B; int8: 2048 + 128
    assert plan_weights(model, None, 0.0).quantize_saves_bytes == 4096 - 2048 - 128


def test_start_up_check_passes_the_plans_bytes(monkeypatch):
    # offloaded: layers 1 and 3 (1 + 2 GiB); two working buffers of the largest (2 GiB):
    # 10 - 3 + 4 = 11 GiB resident. Every layer offloaded: 10 - 6 + 4 = 8 GiB.
    plan = WeightPlan(10 * GiB, (2 * GiB, GiB, GiB, 2 * GiB), (1, 3), 0)
    assert (plan.resident_bytes, plan.floor_bytes) == (11 * GiB, 8 * GiB)
    monkeypatch.setattr(memory, "weight_budget", lambda device, utilization: (9 * GiB, 10 * GiB))
    with pytest.raises(ValueError) as e:
        check_weights_fit(plan, torch.device("cuda"), 0.9)
    # 2 GiB missing on top of the 3 offloaded, plus two buffers of the largest layer
    assert f"take {11 * GiB} bytes (11.00 GiB), but gpu_memory_utilization=0.9 of 10.0" in str(
        e.value
    )
    assert str(e.value).endswith(
        "Fix: cpu_offload_gb=9 or more (whole layers stream from host memory); "
        "or a higher gpu_memory_utilization (now 0.9)"
    )
    monkeypatch.setattr(memory, "weight_budget", lambda device, utilization: (11 * GiB, 16 * GiB))
    check_weights_fit(plan, torch.device("cuda"), 0.9)  # fits exactly
