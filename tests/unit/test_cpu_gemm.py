"""oneDNN-packed CPU linears (vllm_runner/model/layers/cpu_gemm.py)."""

import pytest
import torch
import torch.nn.functional as F

from vllm_runner.model.layers import cpu_gemm
from vllm_runner.model.layers.linear import MergedColumnParallelLinear, RowParallelLinear

pytestmark = pytest.mark.skipif(
    not cpu_gemm.supported(torch.float32), reason="this torch build has no oneDNN linear"
)


@pytest.mark.parametrize("rows", [1, 3, 32, 257])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_matches_float64_reference(rows, with_bias):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 80, generator=g) * 0.05
    b = torch.randn(96, generator=g) if with_bias else None
    x = torch.randn(rows, 80, generator=g)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    got = cpu_gemm.linear(x, cpu_gemm.pack(w), b)
    assert got.dtype == torch.float32 and got.shape == (rows, 96)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    # as accurate as F.linear itself: the same order of error against float64
    plain = (F.linear(x, w, b).double() - ref).abs().max()
    assert (got.double() - ref).abs().max() <= 4 * plain + 1e-6


def test_packed_linear_keeps_leading_dims_and_takes_strided_input():
    w = torch.randn(16, 24)
    x = torch.randn(2, 5, 48)[..., ::2]  # [2, 5, 24], not contiguous
    got = cpu_gemm.linear(x, cpu_gemm.pack(w), None)
    torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_pack_model_packs_float_linears_and_frees_their_dense_copy():
    model = torch.nn.Sequential(MergedColumnParallelLinear(8, [6, 6]), RowParallelLinear(12, 8))
    for p in model.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(4, 8)
    expected = model(x)
    assert cpu_gemm.pack_model(model) == 2
    assert all(m.cpu_packed is not None for m in model)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    # one copy in memory: the dense weights become storage-less meta tensors, same shape
    assert all(m.weight.is_meta and m.weight.shape == (m.out_features, m.in_features)
               for m in model)  # fmt: skip


def test_quantized_layers_are_left_alone():
    from vllm_runner.model.layers.quant import Int8WeightOnly

    layer = RowParallelLinear(32, 16)
    torch.nn.init.normal_(layer.weight)
    Int8WeightOnly().quantize(layer, torch.device("cpu"))
    assert cpu_gemm.pack_model(torch.nn.Sequential(layer)) == 0
    assert layer.cpu_packed is None


def test_engine_on_cpu_uses_packed_weights(smol_llm):
    model = smol_llm.engine.runner.model
    layer = model.model.layers[0]
    assert layer.mlp.down_proj.cpu_packed is not None and layer.mlp.down_proj.weight.is_meta
    assert layer.self_attn.qkv_proj.cpu_packed is not None
    # SmolLM2 ties the LM head to the embedding: the lookup still reads the dense weight
    assert model.lm_head.cpu_packed is not None
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not model.lm_head.weight.is_meta
    # stats count the packed layers at their dense size, and the tied head's packed copy
    # on top of the embedding it copies
    head = model.lm_head.cpu_packed.numel() * model.lm_head.cpu_packed.element_size()
    assert head == model.model.embed_tokens.weight.nbytes
    assert smol_llm.stats()["weight_bytes_resident"] == head + sum(
        p.numel() * p.element_size() for p in model.parameters()
    )


def test_untied_lm_head_and_quantized_cpu_model_pack_their_float_layers(tiny_model_dirs):
    from vllm_runner import LLM

    llm = LLM(tiny_model_dirs["llama"], device="cpu", quantization="int8")
    model = llm.engine.runner.model
    assert model.model.layers[0].mlp.down_proj.cpu_packed is None  # int8: its own matmul
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # untied in the tests
    assert model.lm_head.cpu_packed is not None and model.lm_head.weight.is_meta
