"""GPTQ checkpoints: written here from known integers by AutoGPTQ's packing rules, loaded
bit for bit into int4's layout (act order included), engines on them == engines on the
dequantized float weights, and the variants this engine cannot load refused, naming the
value."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from int4_checkpoints import (
    KW,
    LAYERS,
    PARAMS,
    PROMPTS,
    act_order,
    assert_same_outputs,
    check_loaded_weights,
    int4_layer,
    pack_nibbles,
    save_int4,
    save_src,
    shared_input_key,
)

from vllm_runner import LLM, SamplingParams
from vllm_runner.model.layers.prequantized import group_order, resolve_quantization

GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True,
        "checkpoint_format": "gptq"}  # fmt: skip


@pytest.fixture(scope="module")
def src(tmp_path_factory, peaked_llama) -> str:
    return save_src(tmp_path_factory.mktemp("src"), peaked_llama)


def save_gptq(src: str, folder: Path, group_size: int = 32, *, desc_act: bool = False,
              sym: bool = True, fmt: str = "gptq", skip: str | None = None, **config):  # fmt: skip
    """``src`` as a GPTQ checkpoint of random integers (layers named ``skip`` left float):
    (GPTQ folder, dequantized float folder, the values by layer)."""
    gen = torch.Generator().manual_seed(0)
    offset = 1 if fmt == "gptq" else 0  # v1 stores zero - 1
    orders: dict[str, torch.Tensor] = {}

    def make(layer: str, n: int, k: int):
        if skip is not None and skip in layer:
            return None
        g_idx = None
        if desc_act:  # merged layers read one input: one order
            g_idx = orders.setdefault(shared_input_key(layer), act_order(k, group_size, gen))
        zeros = None if sym else (offset, 15 + offset)
        return int4_layer(n, k, group_size, gen, zeros=zeros, g_idx=g_idx)

    def write(layer: str, v) -> dict[str, torch.Tensor]:
        return {
            f"{layer}.qweight": pack_nibbles(v.q.T, 0),  # [K / 8, N]
            f"{layer}.qzeros": pack_nibbles(((v.zero - offset) & 0xF).T, 1),  # [groups, N / 8]
            f"{layer}.scales": v.scale.T.contiguous(),  # [groups, N] fp16
            f"{layer}.g_idx": v.g_idx.clone(),  # (merged layers share one order)
        }

    quant = dict(GPTQ, group_size=group_size, desc_act=desc_act, sym=sym,
                 checkpoint_format=fmt, **config)  # fmt: skip
    return save_int4(src, folder, quant, make, write)


def edit_tensors(path: str, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(f"{path}/model.safetensors")
    edit(tensors)
    save_file(tensors, f"{path}/model.safetensors", metadata={"format": "pt"})


# ---- loading and generation ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "group_size,desc_act,sym,fmt,permuted",
    [  # permuted: the layers whose act order is not already plain (K of 128 and 320)
        (32, True, False, "gptq", LAYERS),
        (32, False, True, "gptq", 0),
        (128, True, True, "gptq_v2", 2),  # only down_proj (K 320) has several groups
        (128, False, False, "gptq", 0),
        (-1, True, False, "gptq", 0),  # one group a row: any order is plain
        (-1, False, True, "gptq_v2", 0),
    ],
)
def test_gptq_loads_exactly_and_generates_the_dequantized_engines_tokens(
    src, tmp_path, group_size, desc_act, sym, fmt, permuted
):
    """Detected with quantization=None; every layer (q/k/v and gate/up merged) dequantizes
    to the checkpoint's (q - zero) * scale bit for bit, in its input order; greedy tokens
    and logprobs are the float engine's on the dequantized weights."""
    path, dequantized, layers = save_gptq(src, tmp_path, group_size, desc_act=desc_act,
                                          sym=sym, fmt=fmt)  # fmt: skip
    llm = LLM(path, **KW)
    assert llm.engine.runner.config.quantization == "gptq"
    assert check_loaded_weights(llm.engine.runner.model, layers) == (LAYERS, permuted)
    want = LLM(dequantized, **KW).generate(PROMPTS, PARAMS)
    assert_same_outputs(llm.generate(PROMPTS, PARAMS), want)


def test_act_order_offloaded_and_planned(src, tmp_path):
    """The input orders are parameters: offloading moves them with the weights (same
    tokens), and the plan counts them (planned bytes == loaded bytes)."""
    from vllm_runner.model.layers.quant import get_quant_method
    from vllm_runner.model.loader import _instantiate
    from vllm_runner.tokenizer import load_hf_config
    from vllm_runner.worker.offload import plan_weights

    path, dequantized, _ = save_gptq(src, tmp_path, 32, desc_act=True, sym=False)
    want = LLM(dequantized, **KW).generate(PROMPTS, PARAMS)
    assert_same_outputs(LLM(path, cpu_offload_gb=1e-6, **KW).generate(PROMPTS, PARAMS), want)
    hf_config = load_hf_config(path)
    method = get_quant_method("gptq", torch.device("cpu"), hf_config)
    meta = _instantiate(hf_config, torch.float32, torch.device("meta"))
    assert method.prepare(meta) == LAYERS
    model = LLM(path, quantization="gptq", **KW).engine.runner.model
    assert plan_weights(meta, method, 0.0).total_bytes == sum(p.nbytes for p in model.parameters())


def test_modules_in_block_to_quantize_leave_the_others_float(src, tmp_path):
    modules = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
               ["mlp.gate_proj", "mlp.up_proj"]]  # fmt: skip
    path, dequantized, layers = save_gptq(src, tmp_path, skip="down_proj",
                                          modules_in_block_to_quantize=modules)  # fmt: skip
    llm = LLM(path, **KW)
    assert check_loaded_weights(llm.engine.runner.model, layers) == (3 * 2, 0)
    want = LLM(dequantized, **KW).generate(PROMPTS[:2], PARAMS)
    assert_same_outputs(llm.generate(PROMPTS[:2], PARAMS), want)


def test_a_checkpoint_with_only_autogptqs_quantize_config_json_loads(src, tmp_path):
    """Older AutoGPTQ checkpoints keep their settings in quantize_config.json (no
    quant_method), not in config.json."""
    import json

    path, dequantized, _ = save_gptq(src, tmp_path, 128, desc_act=True, sym=False)
    config = json.loads(Path(path, "config.json").read_text())
    quant = config.pop("quantization_config")
    del quant["quant_method"]
    Path(path, "config.json").write_text(json.dumps(config))
    Path(path, "quantize_config.json").write_text(json.dumps(quant))
    llm = LLM(path, **KW)
    assert llm.engine.runner.config.quantization == "gptq"
    want = LLM(dequantized, **KW).generate(PROMPTS[:2], PARAMS)
    assert_same_outputs(llm.generate(PROMPTS[:2], PARAMS), want)


# ---- act order -----------------------------------------------------------------------------------
def test_group_order_sorts_inputs_into_runs_of_a_group():
    assert group_order(torch.tensor([0, 0, 1, 1, 2]), 2, 5) is None  # plain: kept
    perm = group_order(torch.tensor([1, 0, 2, 0, 1]), 2, 5)
    assert perm.tolist() == [1, 3, 0, 4, 2] and perm.dtype == torch.int32
    with pytest.raises(ValueError, match=r"g_idx puts 3 inputs in group 0, not 2: int4's "):
        group_order(torch.tensor([0, 0, 1, 0, 2]), 2, 5)
    with pytest.raises(ValueError, match=r"g_idx names group 3, outside 0..2 for 5 inputs"):
        group_order(torch.tensor([0, 0, 1, 1, 3]), 2, 5)


def test_act_order_checkpoints_the_layout_cannot_hold_fail_at_load(src, tmp_path):
    down = "model.layers.0.mlp.down_proj"
    path, _, _ = save_gptq(src, tmp_path / "a", desc_act=True)
    edit_tensors(path, lambda t: t.update({f"{down}.g_idx": torch.zeros(320, dtype=torch.int32)}))
    with pytest.raises(ValueError, match=rf"checkpoint layer '{down}' g_idx puts 320 inputs in "
                       "group 0, not 32"):  # fmt: skip
        LLM(path, **KW)
    k_proj = "model.layers.1.self_attn.k_proj.g_idx"
    path, _, _ = save_gptq(src, tmp_path / "b", desc_act=True)
    edit_tensors(path, lambda t: t.update({k_proj: t[k_proj].flip(0).contiguous()}))
    # (k_proj loads first: q_proj is the one found to differ)
    with pytest.raises(ValueError, match=r"q_proj.input_perm' \(from its g_idx\) orders the "
                       "inputs unlike the layers merged with it"):  # fmt: skip
        LLM(path, **KW)
    path, _, _ = save_gptq(src, tmp_path / "c", desc_act=True)
    config = Path(path, "config.json")
    config.write_text(config.read_text().replace('"desc_act": true', '"desc_act": false'))
    with pytest.raises(ValueError, match=r"g_idx' orders the inputs by group \(act order\), "
                       "but the config declares no act order"):  # fmt: skip
        LLM(path, **KW)
    path, _, _ = save_gptq(src, tmp_path / "d", desc_act=True)
    edit_tensors(path, lambda t: t.pop(f"{down}.g_idx"))
    with pytest.raises(ValueError, match=rf"checkpoint layer '{down}' lacks \['g_idx'\]"):
        LLM(path, **KW)


# ---- refusals, naming the value ------------------------------------------------------------------
def config_with(**quant) -> SimpleNamespace:
    return SimpleNamespace(quantization_config=quant)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"bits": 8}, r"GPTQ bits 8 is not supported: this engine loads 4-bit GPTQ only"),
        ({"bits": 3}, r"GPTQ bits 3 is not supported"),
        ({"bits": 2}, r"GPTQ bits 2 is not supported"),
        ({"group_size": 100}, r"group_size 100 is not supported: it must be -1 \(one group per"),
        ({"group_size": 0}, r"GPTQ group_size 0 is not supported"),
        ({"group_size": True}, r"GPTQ group_size True is not supported"),
        ({"group_size": None}, r"GPTQ group_size None is not supported"),
        ({"checkpoint_format": "marlin"}, r"GPTQ checkpoint_format 'marlin' is not supported"),
        ({"desc_act": "yes"}, r"GPTQ desc_act 'yes' must be true or false"),
        ({"pack_dtype": "int16"}, r"GPTQ pack_dtype 'int16' is not supported"),
        ({"lm_head": True}, r"GPTQ lm_head true \(a quantized LM head\) is not supported"),
        ({"dynamic": {"-:.*down_proj": {}}}, r"GPTQ dynamic \{'-:.\*down_proj': \{\}\} \(per-"),
    ],
)
def test_gptq_variants_this_engine_cannot_read_are_refused(change, message):
    for requested in (None, "gptq"):
        with pytest.raises(ValueError, match=message):
            resolve_quantization(requested, config_with(**dict(GPTQ, **change)))


def test_resolve_quantization_detects_gptq_and_refuses_contradictions():
    assert resolve_quantization(None, config_with(**GPTQ)) == "gptq"
    assert resolve_quantization("gptq", config_with(**GPTQ)) == "gptq"
    with pytest.raises(ValueError) as e:
        resolve_quantization("int4", config_with(**GPTQ))
    assert str(e.value) == (
        "quantization='int4' quantizes a float checkpoint at load, but this checkpoint is "
        "already quantized (quantization_config quant_method 'gptq'): pass "
        "quantization='gptq' or None"
    )
    with pytest.raises(ValueError, match=r"quantization='awq' loads another format, but"):
        resolve_quantization("awq", config_with(**GPTQ))
    with pytest.raises(ValueError, match=r"quantization='gptq' needs a GPTQ checkpoint \(config"
                       r"\.json quantization_config with quant_method 'gptq'\); this one has "
                       "no quantization_config"):  # fmt: skip
        resolve_quantization("gptq", SimpleNamespace())


@pytest.mark.gpu
def test_gpu_gptq_act_order_engine_equals_dequantized_engine_in_fp32(peaked_llama, tmp_path):
    """Groups of 128 with act order on the Triton kernel (the input gather before it;
    prefill, batched and lone decode, CUDA graphs): the GPTQ engine's greedy tokens are the
    dequantized float engine's, fp32 on both."""
    src = peaked_llama(str(tmp_path / "src"), ("embed",), vocab_size=4096, hidden_size=512,
                       intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=1024)  # fmt: skip
    kw = dict(dtype="float32", device="cuda", max_model_len=512, gpu_memory_utilization=0.3)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    prompts = [[(7 * i + j) % 4096 for j in range(5 + 17 * i)] for i in range(8)]
    for sub, desc_act in (("act", True), ("plain", False)):
        path, dequantized, _ = save_gptq(src, tmp_path / sub, 128, desc_act=desc_act, sym=False)
        want = [o.outputs[0].token_ids for o in LLM(dequantized, **kw).generate(prompts, params)]
        gptq = LLM(path, **kw)
        assert [o.outputs[0].token_ids for o in gptq.generate(prompts, params)] == want, sub
        assert gptq.generate(prompts[:1], params)[0].outputs[0].token_ids == want[0], sub
