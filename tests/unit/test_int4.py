"""int4 (W4A16, group-wise) quantization: the exact error bound, packing, layers vs the
reference, int4 engines == float engines on the dequantized weights (resident and offloaded),
and on a GPU the Triton path at model scale."""

import shutil

import pytest
import torch

from kernels import reference
from vllm_runner import LLM, SamplingParams
from vllm_runner.model.layers.int4 import GROUP_SIZE, Int4WeightOnly, pack_int4, quantize_int4
from vllm_runner.model.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from vllm_runner.model.layers.quant import get_quant_method
from vllm_runner.worker.offload import align, decoder_layers


def grouped(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, groups] per-group values repeated over their inputs: [N, groups * group_size]."""
    return t.repeat_interleave(group_size, dim=-1)


def awkward_weights(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Gaussian weights with an outlier channel, an all-zero one, an all-positive and an
    all-negative group, and groups of very different scales."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[3] *= 40
    w[5] = 0.0
    w[6, :GROUP_SIZE] = w[6, :GROUP_SIZE].abs() + 0.01
    w[7, :GROUP_SIZE] = -w[7, :GROUP_SIZE].abs() - 0.01
    w[8, GROUP_SIZE:] *= 1e-3
    return w


# ---- the math ------------------------------------------------------------------------------
@pytest.mark.parametrize("cols", [256, 200, 203], ids=["whole-groups", "short-group", "K%8"])
def test_int4_roundtrip_within_half_a_step(cols):
    """|w - (q - zero) * scale| <= scale / 2 for every weight (up to the fp32 rounding of the
    quotient and the product: 1e-6 of it), for every kind of group."""
    w = awkward_weights(12, cols)
    packed, scale, zero = quantize_int4(w)
    groups = -(-cols // GROUP_SIZE)
    assert packed.dtype == torch.int32 and packed.shape == (12, -(-cols // 8))
    assert scale.dtype == torch.float32 and scale.shape == (12, groups)
    assert zero.dtype == torch.uint8 and zero.shape == (12, groups)
    assert int(zero.max()) <= 15
    q = reference.int4_unpack(packed, cols)
    assert q.shape == (12, cols) and int(q.min()) >= 0 and int(q.max()) <= 15
    deq = reference.int4_dequantize(packed, scale, zero, GROUP_SIZE, cols)
    step = grouped(scale, GROUP_SIZE)[:, :cols]
    err = (deq - w).abs()
    assert (err <= step / 2 * (1 + 1e-6)).all()
    assert (err / step).max() > 0.45  # the bound is tight: some weight sits near mid-step
    # every non-zero group spans the grid: its smallest weight lands on 0 or its largest on 15
    padded = torch.nn.functional.pad(q, (0, groups * GROUP_SIZE - cols), value=7)
    ends = padded.view(12, groups, -1)
    nonzero = w.abs().amax(dim=1) > 0
    assert ((ends.amin(-1) == 0) | (ends.amax(-1) == 15))[nonzero].all()
    assert (q[5] == zero[5, 0]).all() and (deq[5] == 0).all()  # all-zero: exact zeros
    assert zero[6, 0] == 0 and zero[7, 0] == 15  # 0 stays in the range of one-signed groups


def test_pack_int4_nibble_order_and_sign_bit():
    """Nibble i of word j is k = 8j + i; 15 in the top nibble sets the int32 sign bit."""
    q = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15, 9, 10]])
    packed = pack_int4(q)
    assert packed.tolist() == [[0xF7654321 - 2**32, 0xA9]]  # padded with zero nibbles
    assert reference.int4_unpack(packed, 10).tolist() == q.tolist()
    rand = torch.randint(0, 16, (7, 61), generator=torch.Generator().manual_seed(0))
    assert torch.equal(reference.int4_unpack(pack_int4(rand), 61), rand)


def test_int4_layer_error_vs_float():
    """Round-to-nearest int4 in groups of 128: each weight is off by ~0.29 of a step rms; a
    Gaussian group of 128 spans ~5 standard deviations, so a step is ~0.35 of one and the
    output error ~10% (int8's: ~0.4%)."""
    torch.manual_seed(0)
    layer = RowParallelLinear(512, 64)
    layer.weight.data.normal_(0, 0.05)
    x = torch.randn(9, 512)
    expected = layer(x)
    Int4WeightOnly().quantize(layer, torch.device("cpu"))
    out = layer(x)
    error = float((out - expected).norm() / expected.norm())
    assert 0.05 < error < 0.13


def test_int4_layer_equals_reference_and_weight_bytes():
    layer = MergedColumnParallelLinear(200, [40, 40], bias=True)
    layer.weight.data.normal_(0, 0.05)
    layer.bias.data.normal_()
    method = get_quant_method("int4", torch.device("cpu"))
    assert isinstance(method, Int4WeightOnly) and method.group_size == 128
    with torch.device("meta"):
        meta = MergedColumnParallelLinear(200, [40, 40], bias=True)
    planned = method.tensor_nbytes(meta)
    method.quantize(layer, torch.device("cpu"))
    assert planned == [80 * 25 * 4, 80 * 2 * 4, 80 * 2]
    assert planned == [p.nbytes for p in (layer.weight, layer.weight_scale, layer.weight_zero)]
    assert method.weight_nbytes(meta) == sum(planned)
    assert layer.quant_method is method and not method.one_row_gemv()
    x = torch.randn(3, 200)
    args = (layer.weight, layer.weight_scale, layer.weight_zero, 128, layer.bias)
    assert torch.equal(layer(x), reference.w4a16_linear(x, *args))
    gated = reference.silu_and_mul(reference.w4a16_linear(x, *args))
    assert torch.equal(layer.forward_silu_and_mul(x), gated)


def test_int4_layers_take_no_fused_one_row_path(monkeypatch):
    """Where a float layer would run a lone row on the fused GEMV, an int4 layer declines
    (the GEMV reads 8- and 16-bit weights): the decoder layer takes its unfused path."""
    from vllm_runner.model.layers import linear

    monkeypatch.setattr(linear, "gemv_takes", lambda x, weight: True)  # as on a GPU
    layer = RowParallelLinear(64, 32)
    layer.weight.data.normal_()
    x = torch.randn(1, 64)
    assert layer.fuses_one_row(x)
    Int4WeightOnly().quantize(layer, torch.device("cpu"))
    assert not layer.fuses_one_row(x)


# ---- int4 engines == float engines on the dequantized checkpoint ------------------------------
def save_dequantized(src: str, folder) -> str:
    """``src`` with every decoder linear weight replaced by its int4 dequantization (what an
    int4 engine of ``src`` computes with, exactly: rows quantize independently, so q, k and v
    quantized apart equal their merged layer quantized)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, folder)
    tensors = load_file(f"{src}/model.safetensors")
    for name, t in tensors.items():
        if t.dim() == 2 and not any(s in name for s in ("embed", "lm_head")):
            packed, scale, zero = quantize_int4(t)
            tensors[name] = reference.int4_dequantize(packed, scale, zero, 128, t.shape[1])
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return str(folder)


PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=3)
PROMPTS = [[(13 * i + 7 * j) % 384 for j in range(5 + 9 * i)] for i in range(5)]


def assert_same_outputs(got: list, want: list) -> None:
    for a, b in zip(got, want, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            assert list(x) == list(y)
            assert list(x.values()) == pytest.approx(list(y.values()), abs=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "phi3"])
def test_int4_engine_equals_float_engine_on_dequantized_weights(family, tiny_model_dirs, tmp_path):
    """Fused q/k/v and gate/up (Phi-3: fused in the checkpoint too), biases (Qwen2, OPT),
    tied heads, K shorter than a group and a short last group (Qwen2's down_proj, K 160):
    resident or offloaded, an int4 engine's greedy tokens and logprobs are the float
    engine's on the dequantized weights."""
    dequantized = save_dequantized(tiny_model_dirs[family], tmp_path / "dequantized")
    kw = dict(dtype="float32", device="cpu", num_kv_blocks=64)
    expected = LLM(dequantized, **kw).generate(PROMPTS, PARAMS)
    for extra in ({}, {"cpu_offload_gb": 1e-6}):
        llm = LLM(tiny_model_dirs[family], quantization="int4", **kw, **extra)
        assert_same_outputs(llm.generate(PROMPTS, PARAMS), expected)


def test_planned_weight_bytes_are_the_loaded_ones(tiny_model_dirs):
    """The plan (on the meta model, before loading) counts an int4 engine's weights exactly."""
    from vllm_runner.model.loader import _instantiate
    from vllm_runner.tokenizer import load_hf_config
    from vllm_runner.worker.offload import plan_weights

    path = tiny_model_dirs["qwen2"]
    meta = _instantiate(load_hf_config(path), torch.float32, torch.device("meta"))
    plan = plan_weights(meta, Int4WeightOnly(), 0.0)
    llm = LLM(path, quantization="int4", dtype="float32", device="cpu", num_kv_blocks=64)
    model = llm.engine.runner.model  # (a packed CPU layer's weight is meta: same nbytes)
    assert plan.total_bytes == sum(p.nbytes for p in model.parameters())


def test_offloaded_int4_moves_packed_bytes(tiny_model_dirs):
    """The offloader's host copy of an int4 layer is its packed words, scales and zeros (the
    plan's bytes), ~0.5 byte a weight plus 5 bytes per 128."""
    kw = dict(dtype="float32", device="cpu", num_kv_blocks=64)
    llm = LLM(tiny_model_dirs["llama"], quantization="int4", cpu_offload_gb=1e-6, **kw)
    model = llm.engine.runner.model
    layer = decoder_layers(model)[-1]
    linears = [m for m in layer.modules() if hasattr(m, "quant_method")]
    assert {m.weight.dtype for m in linears} == {torch.int32}
    assert {m.weight_zero.dtype for m in linears} == {torch.uint8}
    host = model.weight_offloader.host[-1]
    assert host.numel() == sum(align(p.nbytes) for m in linears for p in m.parameters())
    numel = sum(m.in_features * m.out_features for m in linears)
    packed = sum(p.nbytes for m in linears for p in m.parameters())
    assert packed == numel // 2 + sum(m.out_features * 5 for m in linears)  # K <= 128: 1 group


# ---- GPU ---------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_int4_engine_vs_dequantized_engine(dtype, peaked_llama, tmp_path):
    """A 4-layer Llama of SmolLM2's widths (K 576: four whole groups and a half one) with
    peaked logits: in fp32 the int4 engine's greedy tokens are the dequantized float
    engine's; in bf16 (which rounds differently on each side) every first token is in the
    float engine's top-5."""
    src = peaked_llama(str(tmp_path / "src"), ("embed",), vocab_size=4096, hidden_size=576,
                       intermediate_size=1536, num_hidden_layers=4, num_attention_heads=9,
                       num_key_value_heads=3, max_position_embeddings=1024)  # fmt: skip
    dequantized = save_dequantized(src, tmp_path / "dequantized")
    kw = dict(dtype=dtype, device="cuda", max_model_len=512, gpu_memory_utilization=0.3)
    prompts = [[(7 * i + j) % 4096 for j in range(5 + 17 * i)] for i in range(8)]
    if dtype == "float32":
        params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
        want = [o.outputs[0].token_ids for o in LLM(dequantized, **kw).generate(prompts, params)]
        got = LLM(src, quantization="int4", **kw).generate(prompts, params)
        assert [o.outputs[0].token_ids for o in got] == want
        return
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, logprobs=5)
    top5 = [set(o.outputs[0].logprobs[0]) for o in LLM(dequantized, **kw).generate(prompts, params)]
    int4 = LLM(src, quantization="int4", **kw)
    got = [o.outputs[0].token_ids[0] for o in int4.generate(prompts, params)]
    assert all(g in t for g, t in zip(got, top5, strict=True)), (got, top5)
    assert int4.engine.runner.graphs is not None  # int4 layers capture fine
