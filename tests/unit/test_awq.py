"""AWQ checkpoints: AutoAWQ's packing read exactly, the checkpoint's dequantized weights
loaded bit for bit, engines on AWQ == engines on the dequantized float weights, and every
variant this engine cannot load refused up front, naming the value."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from kernels import reference
from vllm_runner import LLM, SamplingParams
from vllm_runner.model.layers.awq import AwqConfig, awq_config, unpack_awq
from vllm_runner.model.layers.prequantized import resolve_quantization
from vllm_runner.model.layers.quant import get_quant_method
from vllm_runner.worker.offload import decoder_layers

AWQ = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}


# ---- a checkpoint in AutoAWQ's format, built here -----------------------------------------------
def awq_pack(ints: torch.Tensor) -> torch.Tensor:
    """[R, C] values 0..15 -> [R, C / 8] int32 as AutoAWQ's GEMM packer writes them: word c
    holds columns 8c .. 8c + 7, column 8c + (0, 2, 4, 6, 1, 3, 5, 7)[i] in bits 4i..4i+3."""
    order = (0, 2, 4, 6, 1, 3, 5, 7)
    words = torch.zeros(ints.shape[0], ints.shape[1] // 8, dtype=torch.int64)
    for i, column in enumerate(order):
        words |= ints[:, column::8].long() << (4 * i)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def awq_quantize(w: torch.Tensor, group_size: int):
    """AutoAWQ's zero-point quantizer (min / max of each group, fp16 scales): q [N, K],
    zeros [N, K / G] and scales [N, K / G] fp16, and the dequantized weight (q - z) * s."""
    n, k = w.shape
    groups = w.float().view(n, k // group_size, group_size)
    hi, lo = groups.amax(-1), groups.amin(-1)
    scales = ((hi - lo).clamp(min=1e-5) / 15).half()
    zeros = (-torch.round(lo / scales.float())).clamp(0, 15)
    q = (torch.round(groups / scales.float()[..., None]) + zeros[..., None]).clamp(0, 15)
    deq = ((q - zeros[..., None]) * scales.float()[..., None]).view(n, k)
    return q.view(n, k).int(), zeros.int(), scales, deq


def save_awq(src: str, folder, group_size: int = 32, skip: tuple[str, ...] = ()):
    """``src`` as an AWQ checkpoint (decoder linears quantized but those named in ``skip``);
    returns (AWQ folder, a float folder of the same weights dequantized, the dequantized
    weights by HF layer name)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(f"{src}/model.safetensors")
    awq, dequantized, source = {}, dict(tensors), {}
    for name, t in tensors.items():
        layer = name.removesuffix(".weight")
        linear = t.dim() == 2 and ".layers." in name and name.endswith("_proj.weight")
        linear = linear or name.endswith(("fc1.weight", "fc2.weight"))  # OPT's MLP
        if not linear or any(s in name for s in skip):
            awq[name] = t
            continue
        q, zeros, scales, deq = awq_quantize(t, group_size)
        awq[f"{layer}.qweight"] = awq_pack(q.T.contiguous())
        awq[f"{layer}.qzeros"] = awq_pack(zeros.T.contiguous())
        awq[f"{layer}.scales"] = scales.T.contiguous()
        dequantized[name] = source[layer] = deq
    paths = []
    for sub, data in (("awq", awq), ("dequantized", dequantized)):
        shutil.copytree(src, folder / sub)
        save_file(data, folder / sub / "model.safetensors", metadata={"format": "pt"})
        paths.append(str(folder / sub))
    config = json.loads((folder / "awq" / "config.json").read_text())
    config["quantization_config"] = dict(AWQ, group_size=group_size,
                                         modules_to_not_convert=list(skip) or None)  # fmt: skip
    (folder / "awq" / "config.json").write_text(json.dumps(config))
    return paths[0], paths[1], source


# ---- the packing ---------------------------------------------------------------------------------
def test_unpack_awq_reads_autoawqs_nibble_order():
    """Columns 1..8 of one word: AutoAWQ writes columns 0, 2, 4, 6 in nibbles 0-3 and 1, 3,
    5, 7 in nibbles 4-7 (0x86427531), the sign bit set by column 7's 8."""
    word = torch.tensor([[0x86427531 - 2**32]], dtype=torch.int32)
    assert unpack_awq(word).tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]
    assert torch.equal(awq_pack(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])), word)
    rand = torch.randint(0, 16, (5, 48), generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_awq(awq_pack(rand)), rand)
    with pytest.raises(ValueError, match="torch.int64, not the int32 words"):
        unpack_awq(rand)


# ---- loading -------------------------------------------------------------------------------------
KW = dict(dtype="float32", device="cpu", num_kv_blocks=64)
PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=3)
PROMPTS = [[(13 * i + 7 * j) % 384 for j in range(5 + 9 * i)] for i in range(5)]
MERGED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@pytest.mark.parametrize("family,group_size", [("llama", 32), ("llama", 64), ("phi3", 32),
                                               ("qwen2", 32), ("opt", 64)])  # fmt: skip
def test_awq_checkpoint_loads_its_dequantized_weights_exactly(
    family, group_size, tiny_model_dirs, tmp_path
):
    """Every quantized layer (q/k/v and gate/up merged by the loader; Phi-3's fused in the
    checkpoint) dequantizes to the checkpoint's own (q - zero) * scale, bit for bit; the
    engine detects AWQ with quantization=None and keeps 4-bit weights."""
    path, _, source = save_awq(tiny_model_dirs[family], tmp_path, group_size)
    llm = LLM(path, **KW)
    assert llm.engine.runner.config.quantization == "awq"
    checked = 0
    for name, layer in llm.engine.runner.model.named_modules():
        if not hasattr(layer, "quant_method"):
            continue
        assert layer.quant_method.name == "awq" and layer.weight.dtype == torch.int32
        prefix, _, leaf = name.rpartition(".")
        parts = MERGED.get(leaf, (leaf,)) if family != "phi3" else (leaf,)
        want = torch.cat([source[f"{prefix}.{part}"] for part in parts])
        got = reference.int4_dequantize(layer.weight, layer.weight_scale, layer.weight_zero,
                                        group_size, layer.in_features)  # fmt: skip
        assert torch.equal(got, want), name
        checked += 1
    assert checked == 4 * 2


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt"])
def test_awq_engine_equals_float_engine_on_dequantized_weights(family, tiny_model_dirs, tmp_path):
    """Auto-detected or named, resident or offloaded: an AWQ engine's greedy tokens and
    logprobs are those of the float engine on the dequantized weights (fp32; summation order
    aside)."""
    path, dequantized, _ = save_awq(tiny_model_dirs[family], tmp_path)
    expected = LLM(dequantized, **KW).generate(PROMPTS, PARAMS)
    for extra in ({}, {"quantization": "awq"}, {"cpu_offload_gb": 1e-6}):
        got = LLM(path, **KW, **extra).generate(PROMPTS, PARAMS)
        for a, b in zip(got, expected, strict=True):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids, extra
            for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
                assert list(x) == list(y)
                assert list(x.values()) == pytest.approx(list(y.values()), abs=1e-4)


def test_planned_weight_bytes_are_the_loaded_ones(tiny_model_dirs, tmp_path):
    """The plan counts the int4 tensors of the prepared meta model: the bytes that load."""
    from vllm_runner.model.loader import _instantiate
    from vllm_runner.tokenizer import load_hf_config
    from vllm_runner.worker.offload import plan_weights

    path, _, _ = save_awq(tiny_model_dirs["llama"], tmp_path)
    hf_config = load_hf_config(path)
    method = get_quant_method("awq", torch.device("cpu"), hf_config)
    meta = _instantiate(hf_config, torch.float32, torch.device("meta"))
    assert method.prepare(meta) == 4 * 2
    plan = plan_weights(meta, method, 0.0)
    model = LLM(path, **KW).engine.runner.model
    assert plan.total_bytes == sum(p.nbytes for p in model.parameters())


def test_modules_to_not_convert_stay_float(tiny_model_dirs, tmp_path):
    """Layers the config leaves out (here every down_proj) load their float weights."""
    path, dequantized, _ = save_awq(tiny_model_dirs["llama"], tmp_path, skip=("down_proj",))
    llm = LLM(path, **KW)
    layer = decoder_layers(llm.engine.runner.model)[0]
    assert layer.mlp.down_proj.quant_method is None
    assert layer.mlp.gate_up_proj.quant_method.name == "awq"
    want = LLM(dequantized, **KW).generate(PROMPTS[:2], PARAMS)
    got = llm.generate(PROMPTS[:2], PARAMS)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]


def test_a_quantization_that_contradicts_the_checkpoint_fails_before_loading(
    tiny_model_dirs, tmp_path
):
    path, _, _ = save_awq(tiny_model_dirs["llama"], tmp_path)
    with pytest.raises(ValueError, match=r"quantization='int4' quantizes a float checkpoint"):
        LLM(path, quantization="int4", **KW)
    with pytest.raises(ValueError, match=r"quantization='awq' needs an AWQ checkpoint .* this "
                       r"one has no quantization_config"):  # fmt: skip
        LLM(tiny_model_dirs["llama"], quantization="awq", **KW)


# ---- refusals, naming the value ------------------------------------------------------------------
def config_with(**quant) -> SimpleNamespace:
    return SimpleNamespace(quantization_config=quant)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"bits": 8}, "AWQ bits 8 is not supported: this engine loads 4-bit AWQ only"),
        ({"version": "gemv"}, "AWQ version 'gemv' is not supported"),
        ({"version": "gemv_fast"}, "AWQ version 'gemv_fast' is not supported"),
        ({"version": "marlin"}, "AWQ version 'marlin' is not supported"),
        ({"zero_point": False}, "AWQ zero_point False is not supported"),
        ({"group_size": -1}, r"AWQ group_size -1 is not supported: .* positive multiple of 16"),
        ({"group_size": 100}, "AWQ group_size 100 is not supported"),
    ],
)
def test_awq_variants_this_engine_cannot_read_are_refused(change, message):
    for requested in (None, "awq"):
        with pytest.raises(ValueError, match=message):
            resolve_quantization(requested, config_with(**dict(AWQ, **change)))


def test_awq_config_reads_autoawq_and_transformers_spellings():
    assert awq_config(AWQ) == AwqConfig(32)
    autoawq = {"quant_method": "awq", "w_bit": 4, "q_group_size": 128, "zero_point": True,
               "version": "GEMM", "modules_to_not_convert": ["visual"]}  # fmt: skip
    assert awq_config(autoawq) == AwqConfig(128, ("visual",))
    method = get_quant_method("awq", torch.device("cpu"), config_with(**autoawq))
    assert method.group_size == 128 and method.prequantized


def test_resolve_quantization_detects_awq_and_passes_the_rest():
    assert resolve_quantization(None, config_with(**AWQ)) == "awq"
    assert resolve_quantization("awq", config_with(**AWQ)) == "awq"
    for requested in ("int8", "fp8", "int4"):
        with pytest.raises(ValueError) as e:
            resolve_quantization(requested, config_with(**AWQ))
        assert str(e.value) == (
            f"quantization={requested!r} quantizes a float checkpoint at load, but this "
            "checkpoint is already quantized (quantization_config quant_method 'awq'): pass "
            "quantization='awq' or None"
        )
    plain = SimpleNamespace()
    assert [resolve_quantization(q, plain) for q in (None, "int4")] == [None, "int4"]
    # other pre-quantized formats fail at load, naming their quant_method (test_loading.py)
    assert resolve_quantization(None, config_with(quant_method="fp8")) is None
    with pytest.raises(ValueError, match="this one has quant_method 'fp8'"):
        resolve_quantization("awq", config_with(quant_method="fp8"))


@pytest.mark.gpu
def test_gpu_awq_engine_equals_dequantized_engine_in_fp32(peaked_llama, tmp_path):
    """Groups of 128 on the Triton kernel (prefill, batched and lone decode, CUDA graphs):
    the AWQ engine's greedy tokens are the dequantized float engine's, fp32 on both."""
    src = peaked_llama(str(tmp_path / "src"), ("embed",), vocab_size=4096, hidden_size=256,
                       intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=1024)  # fmt: skip
    path, dequantized, _ = save_awq(src, tmp_path, group_size=128)
    kw = dict(dtype="float32", device="cuda", max_model_len=512, gpu_memory_utilization=0.3)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    prompts = [[(7 * i + j) % 4096 for j in range(5 + 17 * i)] for i in range(8)]
    want = [o.outputs[0].token_ids for o in LLM(dequantized, **kw).generate(prompts, params)]
    awq = LLM(path, **kw)
    assert [o.outputs[0].token_ids for o in awq.generate(prompts, params)] == want
    assert awq.generate(prompts[:1], params)[0].outputs[0].token_ids == want[0]
