"""Weight quantization: int8 / fp8 math on CPU, quantized layers vs float, int8 on SmolLM2."""

import math

import pytest
import torch

from kernels import reference
from vllm_runner import LLM, SamplingParams
from vllm_runner.model.layers.attention import AttentionMetadata, forward_context
from vllm_runner.model.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from vllm_runner.model.layers.quant import (
    Fp8W8A8,
    Int8WeightOnly,
    dequantize_rows,
    get_quant_method,
    quantize_fp8_rows,
    quantize_int8,
)

FP8_MAX = 448.0
FP8_MIN_NORMAL = 2.0**-6


def gaussian(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[3] *= 40  # one outlier channel: its scale must not leak into the others
    w[5] = 0.0  # an all-zero channel
    return w


# ---- int8 math -----------------------------------------------------------------------------
def test_int8_roundtrip_within_half_a_step():
    w = gaussian(16, 96)
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (16,)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127  # symmetric: -128 unused
    err = (dequantize_rows(q, scale) - w).abs()
    assert (err <= scale[:, None] / 2 * (1 + 1e-6)).all()
    # each channel's absmax lands on +-127 exactly
    row_max = q.abs().amax(dim=1)
    assert ((row_max == 127) | (w.abs().amax(dim=1) == 0)).all()
    assert (q[5] == 0).all() and torch.isfinite(scale).all()


# ---- fp8 math ------------------------------------------------------------------------------
def test_fp8_roundtrip_relative_error():
    """e4m3 keeps 3 mantissa bits: round-to-nearest is within 2^-4 relative for normal
    values, within half the smallest subnormal step (2^-10 of the scale) below."""
    w = gaussian(16, 256, seed=1)
    q, scale = quantize_fp8_rows(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (16,)
    assert (q.float().abs().amax(dim=1)[w.abs().amax(dim=1) > 0] == FP8_MAX).all()
    deq = dequantize_rows(q, scale)
    scaled = w / scale[:, None]
    normal = scaled.abs() >= FP8_MIN_NORMAL
    rel = ((deq - w).abs() / w.abs().clamp(min=1e-30))[normal]
    assert rel.max() <= 2.0**-4 * (1 + 1e-6)
    sub = ((deq - w).abs() / scale[:, None])[~normal]
    assert sub.max() <= 2.0**-10 * (1 + 1e-6)
    assert (q[5].float() == 0).all()


def test_fp8_per_token_scales_are_dynamic():
    x = torch.randn(4, 64)
    x[2] *= 1000
    q, scale = quantize_fp8_rows(x)
    torch.testing.assert_close(scale, x.abs().amax(dim=1) / FP8_MAX)
    small, _ = quantize_fp8_rows(x[:1])
    assert torch.equal(small.float(), q[:1].float())  # a token's scale ignores its neighbours


# ---- quantized layers vs float --------------------------------------------------------------
def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


@pytest.mark.parametrize("method_cls,bound", [(Int8WeightOnly, 0.01), (Fp8W8A8, 0.05)])
def test_quantized_linear_close_to_float(method_cls, bound):
    """Relative output error on Gaussian data: int8 ~0.4% (half-step error / sqrt(3) of a
    ~1/127 step ratio), fp8 ~3% (weights and activations each ~2% rms)."""
    torch.manual_seed(0)
    layer = MergedColumnParallelLinear(128, [64, 64], bias=False)
    layer.weight.data.normal_(0, 0.05)
    x = torch.randn(9, 128)
    expected = layer(x)
    method = method_cls()
    method.quantize(layer, torch.device("cpu"))
    assert layer.weight.dtype == method.weight_dtype and layer.quant_method is method
    assert layer.weight_scale.shape == (128,)
    out = layer(x)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert relative_error(out, expected) < bound


def test_fp8_layer_equals_emulated_reference_and_handles_bias():
    torch.manual_seed(1)
    layer = RowParallelLinear(64, 32, bias=True)
    layer.weight.data.normal_(0, 0.05)
    layer.bias.data.normal_()
    x = torch.randn(5, 64)
    expected = layer(x)
    Fp8W8A8().quantize(layer, torch.device("cpu"))
    out = layer(x)
    emulated = reference.w8a8_fp8_linear(x, layer.weight, layer.weight_scale, layer.bias)
    torch.testing.assert_close(out, emulated, atol=1e-5, rtol=1e-5)
    assert relative_error(out, expected) < 0.05


def test_int8_layer_equals_reference_and_weight_bytes():
    layer = MergedColumnParallelLinear(96, [40, 40], bias=True)
    layer.weight.data.normal_(0, 0.05)
    layer.bias.data.normal_()  # NOTE: parameters start as torch.empty: garbage, even NaN
    method = Int8WeightOnly()
    with torch.device("meta"):
        meta = MergedColumnParallelLinear(96, [40, 40], bias=True)
    planned = method.weight_nbytes(meta)
    method.quantize(layer, torch.device("cpu"))
    assert planned == layer.weight.nbytes + layer.weight_scale.nbytes == 80 * 96 + 80 * 4
    x = torch.randn(3, 96)
    torch.testing.assert_close(
        layer(x), reference.w8a16_linear(x, layer.weight, layer.weight_scale, layer.bias)
    )


@pytest.mark.parametrize("method_cls", [None, Int8WeightOnly])
def test_merged_layer_silu_and_mul(method_cls):
    """forward_silu_and_mul == silu(gate) * up of the layer's own output, float or int8."""
    layer = MergedColumnParallelLinear(96, [40, 40], bias=True)
    layer.weight.data.normal_(0, 0.05)
    layer.bias.data.normal_()
    if method_cls is not None:
        method_cls().quantize(layer, torch.device("cpu"))
    x = torch.randn(3, 96)
    torch.testing.assert_close(layer.forward_silu_and_mul(x), reference.silu_and_mul(layer(x)))
    with pytest.raises(AssertionError, match="two equal outputs"):
        MergedColumnParallelLinear(96, [40, 24]).forward_silu_and_mul(x)


def test_fp8_skips_shapes_scaled_mm_cannot_take():
    assert not Fp8W8A8().supports(RowParallelLinear(24, 32))
    assert Fp8W8A8().supports(RowParallelLinear(32, 48))


def test_fp8_off_cuda_is_a_clear_error(default_model_dir):
    with pytest.raises(ValueError, match=r"quantization='fp8' needs torch._scaled_mm.*8\.9"):
        get_quant_method("fp8", torch.device("cpu"))
    with pytest.raises(ValueError, match="quantization='fp8'"):
        LLM(default_model_dir, device="cpu", quantization="fp8", max_model_len=64)
    assert get_quant_method(None, torch.device("cpu")) is None


# ---- int8 engines == float engines on the dequantized checkpoint ------------------------------
def save_biased_and_dequantized(src: str, tmp_path) -> tuple[str, str]:
    """``src`` with random biases (the tiny models' are zero), and the same checkpoint with
    every decoder linear weight replaced by its int8 ``q * scale`` (exact in fp32): what an
    int8 engine of the first should compute, up to summation order."""
    import shutil

    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    tensors = load_file(f"{src}/model.safetensors")
    for name, t in tensors.items():
        if name.endswith(".bias") and "norm" not in name:  # projections, not LayerNorms
            tensors[name] = torch.randn(t.shape, generator=g) * 0.5
    paths = []
    for folder, dequantize in (("biased", False), ("dequantized", True)):
        shutil.copytree(src, tmp_path / folder)
        if dequantize:
            for name, t in tensors.items():
                if t.dim() == 2 and not any(s in name for s in ("embed", "lm_head")):
                    tensors[name] = dequantize_rows(*quantize_int8(t))
        save_file(tensors, tmp_path / folder / "model.safetensors", metadata={"format": "pt"})
        paths.append(str(tmp_path / folder))
    return paths[0], paths[1]


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt"])
def test_int8_engine_equals_float_engine_on_dequantized_weights(family, tiny_model_dirs, tmp_path):
    """Fused q/k/v and gate/up rows keep their own scales, biases (Qwen2 q/k/v, OPT all) stay
    in the model dtype, tied heads stay float: resident or offloaded, an int8 engine's greedy
    tokens and logprobs are the float engine's on the dequantized weights."""
    path, dequantized = save_biased_and_dequantized(tiny_model_dirs[family], tmp_path)
    kw = dict(dtype="float32", device="cpu", num_kv_blocks=64)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=1)
    prompts = [[(13 * i + 7 * j) % 384 for j in range(5 + 9 * i)] for i in range(5)]
    expected = LLM(dequantized, **kw).generate(prompts, params)
    for extra in ({}, {"cpu_offload_gb": 1e-6}):
        llm = LLM(path, quantization="int8", **kw, **extra)
        for got, want in zip(llm.generate(prompts, params), expected, strict=True):
            assert got.outputs[0].token_ids == want.outputs[0].token_ids, extra
            for a, b in zip(got.outputs[0].logprobs, want.outputs[0].logprobs, strict=True):
                assert list(a) == list(b)
                assert list(a.values()) == pytest.approx(list(b.values()), abs=1e-4)


# ---- int8 on the default model ---------------------------------------------------------------
PROMPTS = [
    "The history of the printing press begins",
    "Write a short poem about the sea at night.",
    "Explain how a hash table handles collisions.",
    "What are the main differences between a virus and a bacterium?",
    "List five practical tips for learning a new language:",
    "Describe the water cycle to a ten-year-old.",
    "Why does the moon always show the same face to the Earth?",
    "Give a recipe for a simple vegetable soup.",
]
TEXT = (
    "The lighthouse stood at the edge of the cliff, its white paint peeling after decades of "
    "salt and wind. Every evening the keeper climbed the spiral stairs, trimmed the wick and "
    "wound the clockwork that turned the great lens. Ships far out at sea counted the flashes "
    "to know where they were, and on stormy nights the beam was the only thing that stood "
    "between a safe harbour and the rocks below. When the keeper retired, the light was "
    "automated, and the little house beside the tower was turned into a museum about the "
    "history of navigation along the coast."
)


def teacher_forced_argmax(llm: LLM, ids: list[int]) -> torch.Tensor:
    """Argmax of the next-token logits at every position of ``ids``, in one prefill.

    NOTE: writes K/V into cache blocks 0.. directly, so the engine must have no live requests
    and prefix caching off (no block keeps a hash of stale contents).
    """
    runner = llm.engine.runner
    n, bs = len(ids), runner.cache_config.block_size
    md = AttentionMetadata(
        slot_mapping=torch.arange(n),
        block_tables=torch.arange(-(-n // bs), dtype=torch.int32)[None],
        seq_lens=torch.tensor([n], dtype=torch.int32),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        max_query_len=n,
        max_seq_len=n,
    )
    with torch.inference_mode(), forward_context(md):
        hidden = runner.model(torch.tensor(ids), torch.arange(n))
        return runner.model.compute_logits(hidden).argmax(dim=-1)


def perplexity(llm: LLM, text: str) -> float:
    out = llm.generate(text, SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    pairs = zip(out.prompt_logprobs, out.prompt_token_ids, strict=True)
    logprobs = [top[token] for top, token in pairs if top is not None]
    assert len(logprobs) > 80
    return math.exp(-sum(logprobs) / len(logprobs))


@pytest.fixture(scope="module")
def fp32_and_int8(default_model_dir) -> tuple[LLM, LLM]:
    kw = dict(dtype="float32", device="cpu", max_model_len=512, cpu_kv_cache_gb=0.1)
    kw["enable_prefix_caching"] = False
    return LLM(default_model_dir, **kw), LLM(default_model_dir, quantization="int8", **kw)


@pytest.mark.slow
def test_int8_teacher_forced_top1_agreement(fp32_and_int8):
    full, int8 = fp32_and_int8
    greedy = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    agree = total = 0
    for out in full.generate(PROMPTS, greedy):
        ids = out.prompt_token_ids + out.outputs[0].token_ids
        start = len(out.prompt_token_ids) - 1  # positions that predict the 64 new tokens
        ref = teacher_forced_argmax(full, ids)[start:-1]
        assert ref.tolist() == out.outputs[0].token_ids  # the helper reproduces greedy decode
        got = teacher_forced_argmax(int8, ids)[start:-1]
        agree += int((got == ref).sum())
        total += len(ref)
    assert total == 8 * 64
    print(f"int8 teacher-forced top-1 agreement: {agree / total:.1%} of {total}")
    assert agree / total >= 0.95


@pytest.mark.slow
def test_int8_perplexity_within_3_percent(fp32_and_int8):
    full, int8 = fp32_and_int8
    ppl_full, ppl_int8 = perplexity(full, TEXT), perplexity(int8, TEXT)
    print(f"perplexity fp32 {ppl_full:.3f}, int8 {ppl_int8:.3f}, ratio {ppl_int8 / ppl_full:.4f}")
    assert abs(ppl_int8 / ppl_full - 1) <= 0.03


# ---- GPU -----------------------------------------------------------------------------------------
def cuda_layer(in_features: int, out_features: int) -> RowParallelLinear:
    torch.manual_seed(0)
    layer = RowParallelLinear(in_features, out_features).to("cuda", torch.bfloat16)
    layer.weight.data.normal_(0, 0.02)
    return layer


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 7, 64, 300])
def test_gpu_fp8_linear_vs_bf16(m):
    """_scaled_mm W8A8 vs the fp32 product of the bf16 inputs: relative (Frobenius) error
    under 5% (e4m3 rounds each operand to within 2^-4, ~2% rms each); vs the fp32 emulation
    of the same quantized operands: under 1% (bf16 output rounding, accumulation order)."""
    from vllm_runner.model.layers.quant import fp8_supported

    ok, what = fp8_supported(torch.device("cuda"))
    if not ok:
        pytest.skip(what)
    layer = cuda_layer(4096, 1024)
    x = torch.randn(m, 4096, device="cuda").bfloat16()
    exact = x.float() @ layer.weight.float().T
    method = Fp8W8A8()
    method.weight_only_max_tokens = 0  # W8A8 _scaled_mm at every M first
    method.quantize(layer, torch.device("cuda"))
    out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == (m, 1024)
    assert relative_error(out, exact) < 0.05
    emulated = reference.w8a8_fp8_linear(x, layer.weight, layer.weight_scale)
    assert relative_error(out, emulated) < 0.01
    method.weight_only_max_tokens = 16  # fp8 weights through the Triton kernel, no act quant
    if m <= 16:
        weight_only = layer(x)
        wo_ref = reference.w8a16_linear(x, layer.weight, layer.weight_scale)
        assert relative_error(weight_only, wo_ref) < 0.01
        assert relative_error(weight_only, exact) < 0.04


@pytest.mark.gpu
def test_gpu_int8_linear_vs_bf16():
    layer = cuda_layer(4096, 1024)
    x = torch.randn(33, 4096, device="cuda").bfloat16()
    exact = x.float() @ layer.weight.float().T
    Int8WeightOnly().quantize(layer, torch.device("cuda"))
    out = layer(x)
    assert relative_error(out, exact) < 0.01
    ref = reference.w8a16_linear(x, layer.weight, layer.weight_scale)
    assert relative_error(out, ref) < 0.005


@pytest.mark.gpu
@pytest.mark.parametrize("method_cls", [Int8WeightOnly, Fp8W8A8])
@pytest.mark.parametrize("m", [1, 33])
def test_gpu_gate_up_fused_silu_and_mul(method_cls, m):
    """A quantized [gate, up] layer's fused activation (one row: the GEMV's epilogue; 33 rows:
    the tiled kernel's for int8, _scaled_mm then the activation kernel for fp8) vs the layer's
    own output through the unfused activation."""
    if method_cls is Fp8W8A8:
        from vllm_runner.model.layers.quant import fp8_supported

        ok, what = fp8_supported(torch.device("cuda"))
        if not ok:
            pytest.skip(what)
    layer = MergedColumnParallelLinear(4096, [14336, 14336]).cuda().bfloat16()
    layer.weight.data.normal_(0, 0.02)
    method_cls().quantize(layer, torch.device("cuda"))
    x = torch.randn(m, 4096, device="cuda").bfloat16()
    fused = layer.forward_silu_and_mul(x)
    unfused = reference.silu_and_mul(layer(x).float())
    assert fused.shape == (m, 14336)
    assert relative_error(fused, unfused) < 0.01
