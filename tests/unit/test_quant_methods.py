"""Exact behaviour of the quantization methods' host-side decisions (layers/quant.py): fp8
admission by compute capability, which shapes each method takes, planned bytes, output
shapes and dtypes, and the one-row / weight-only choices (CPU only; CUDA queries faked)."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from kernels import reference
from vllm_runner.model.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm_runner.model.layers.quant import (
    Fp8W8A8,
    Int8WeightOnly,
    fp8_supported,
    get_quant_method,
    quantize_int8,
    quantize_module,
)


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch.cuda's queries answered for a card of capability ``gpu.capability``; records the
    device index each query was asked about."""
    gpu = SimpleNamespace(capability=(8, 9), asked=[])

    def capability(index):
        gpu.asked.append(index)
        return gpu.capability

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: f"GPU{index}")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    return gpu


@pytest.mark.parametrize(
    ("capability", "ok"), [((8, 6), False), ((8, 9), True), ((9, 0), True), ((10, 0), True)]
)
def test_fp8_needs_compute_capability_8_9(fake_gpu, capability, ok):
    """An L4 / RTX 4090 (8.9) has fp8 tensor cores; an A10 / RTX 3090 (8.6) has not."""
    fake_gpu.capability = capability
    major, minor = capability
    expected = f"GPU1 has compute capability {major}.{minor}"
    assert fp8_supported(torch.device("cuda:1")) == (ok, expected)
    if ok:
        assert isinstance(get_quant_method("fp8", torch.device("cuda:1")), Fp8W8A8)


def test_fp8_on_a_bare_cuda_device_asks_about_the_current_one(fake_gpu):
    fake_gpu.capability = (8, 6)
    assert fp8_supported(torch.device("cuda")) == (False, "GPU3 has compute capability 8.6")
    assert fake_gpu.asked == [3]
    with pytest.raises(ValueError) as e:
        get_quant_method("fp8", torch.device("cuda"))
    assert str(e.value) == (
        "quantization='fp8' needs torch._scaled_mm on a CUDA GPU of compute capability >= 8.9 "
        "(Ada, Hopper or newer), but GPU3 has compute capability 8.6; use quantization='int8' "
        "(weight-only, runs on any device) or quantization=None"
    )


def test_fp8_off_cuda_names_the_device():
    assert fp8_supported(torch.device("cpu")) == (False, "device 'cpu' has no fp8 tensor cores")
    with pytest.raises(ValueError, match=r"but device 'cpu' has no fp8 tensor cores; use"):
        get_quant_method("fp8", torch.device("cpu"))


def test_an_unknown_quantization_names_the_choices():
    with pytest.raises(ValueError) as e:
        get_quant_method("gguf", torch.device("cpu"))
    assert str(e.value) == (
        "quantization must be one of ['awq', 'compressed-tensors', 'fp8', 'gptq', 'int4', "
        "'int8'] or None"
    )
    assert isinstance(get_quant_method("int8", torch.device("cpu")), Int8WeightOnly)


def test_an_all_zero_channel_gets_the_minimum_scale():
    w = torch.zeros(2, 8)
    w[1, 3] = 2.54
    q, scale = quantize_int8(w)
    assert scale.tolist() == [torch.tensor(1e-12).item(), torch.tensor(0.02).item()]
    assert q[0].tolist() == [0] * 8 and q[1, 3] == 127


def test_fp8_takes_only_shapes_divisible_by_16_on_both_sides():
    shapes = {(32, 48): True, (24, 32): False, (32, 24): False, (16, 16): True}
    got = {s: Fp8W8A8().supports(RowParallelLinear(*s)) for s in shapes}
    assert got == shapes
    assert Int8WeightOnly().supports(RowParallelLinear(24, 7))


def test_planned_bytes_of_a_shape_fp8_leaves_unquantized():
    with torch.device("meta"):
        skipped = RowParallelLinear(24, 32)  # fp32: stays as it is
        taken = RowParallelLinear(32, 48)
    assert Fp8W8A8().weight_nbytes(skipped) == 24 * 32 * 4
    assert Fp8W8A8().weight_nbytes(taken) == 32 * 48 + 48 * 4  # 1 B a weight, fp32 scales


def test_quantize_module_skips_shapes_the_method_cannot_take():
    module = nn.Module()
    module.odd = RowParallelLinear(24, 32)
    module.even = RowParallelLinear(32, 48)
    for layer in (module.odd, module.even):
        layer.weight.data.normal_()
    assert quantize_module(module, Fp8W8A8(), torch.device("cpu")) == 1
    assert module.odd.weight.dtype == torch.float32 and module.odd.quant_method is None
    assert module.even.weight.dtype == torch.float8_e4m3fn
    assert module.even.weight_scale.shape == (48,)
    assert quantize_module(module, Fp8W8A8(), torch.device("cpu")) == 0  # nothing left


def test_fp8_layer_keeps_the_input_shape_and_dtype_and_adds_its_bias():
    """A column-parallel layer (Qwen2's q/k/v) passes its bias to the matmul."""
    torch.manual_seed(0)
    layer = ColumnParallelLinear(32, 16, bias=True).bfloat16()
    layer.weight.data.normal_(0, 0.05)
    layer.bias.data.normal_()
    Fp8W8A8().quantize(layer, torch.device("cpu"))
    x = torch.randn(2, 3, 32).bfloat16()
    out = layer(x)
    assert out.shape == (2, 3, 16) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out[1], layer(x[1]))  # each token on its own scale
    expected = reference.w8a8_fp8_linear(x[0], layer.weight, layer.weight_scale, layer.bias)
    torch.testing.assert_close(out[0], expected, atol=2e-2, rtol=1.6e-2)


def test_which_methods_run_one_row_on_the_gemv():
    assert Int8WeightOnly().one_row_gemv()
    fp8 = Fp8W8A8()
    assert fp8.weight_only_max_tokens == 1 and fp8.one_row_gemv()
    fp8.weight_only_max_tokens = 0  # always _scaled_mm
    assert not fp8.one_row_gemv()


def test_fp8_weight_only_rows():
    """A CUDA step of at most weight_only_max_tokens rows skips activation quantization."""

    def step(*shape: int, cuda: bool = True) -> SimpleNamespace:
        numel = torch.Size(shape).numel()
        return SimpleNamespace(is_cuda=cuda, shape=shape, numel=lambda: numel)

    fp8 = Fp8W8A8()
    assert fp8._weight_only(step(1, 64)) and fp8._weight_only(step(1, 1, 64))
    assert not fp8._weight_only(step(2, 64)) and not fp8._weight_only(step(1, 64, cuda=False))
    fp8.weight_only_max_tokens = 16
    assert fp8._weight_only(step(16, 64)) and not fp8._weight_only(step(17, 64))
