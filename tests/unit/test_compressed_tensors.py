"""compressed-tensors W4A16 checkpoints ("pack-quantized"): written here from known integers
by the format's packing rules, loaded bit for bit into int4's layout, engines on them ==
engines on the dequantized float weights, other schemes refused, naming the scheme."""

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

from vllm_runner import LLM
from vllm_runner.model.layers.compressed_tensors import matches
from vllm_runner.model.layers.prequantized import resolve_quantization


@pytest.fixture(scope="module")
def src(tmp_path_factory, peaked_llama) -> str:
    return save_src(tmp_path_factory.mktemp("src"), peaked_llama)


WEIGHTS = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
           "group_size": 32, "actorder": None, "dynamic": False}  # fmt: skip
W4A16 = {"targets": ["Linear"], "weights": WEIGHTS, "input_activations": None,
         "output_activations": None}  # fmt: skip
CT = {"quant_method": "compressed-tensors", "format": "pack-quantized",
      "config_groups": {"group_0": W4A16}, "ignore": ["lm_head"], "kv_cache_scheme": None,
      "quantization_status": "compressed"}  # fmt: skip


def ct_quant(**weights) -> dict:
    return dict(CT, config_groups={"group_0": dict(W4A16, weights=dict(WEIGHTS, **weights))})


def save_ct(src: str, folder, group_size: int = 32, *, symmetric: bool = True,
            actorder: str | None = None, ignore: tuple[str, ...] = ("lm_head",)):  # fmt: skip
    """``src`` as a compressed-tensors checkpoint of random integers (bf16 scales; layers
    matching ``ignore`` left float): (folder, dequantized float folder, values by layer)."""
    gen = torch.Generator().manual_seed(1)
    orders: dict[str, torch.Tensor] = {}

    def make(layer: str, n: int, k: int):
        if matches(layer, ignore):
            return None
        g_idx = None
        if actorder == "group":
            g_idx = orders.setdefault(shared_input_key(layer), act_order(k, group_size, gen))
        zeros = None if symmetric else (0, 15)  # stored z + 8 for z in -8..7
        return int4_layer(n, k, group_size, gen, zeros=zeros, g_idx=g_idx,
                          scale_dtype=torch.bfloat16)  # fmt: skip

    def write(layer: str, v) -> dict[str, torch.Tensor]:
        out = {
            f"{layer}.weight_packed": pack_nibbles(v.q, 1),  # [N, K / 8]: q + 8 of q in -8..7
            f"{layer}.weight_scale": v.scale.contiguous(),  # [N, groups]
            f"{layer}.weight_shape": torch.tensor(v.q.shape),
        }
        if not symmetric:
            out[f"{layer}.weight_zero_point"] = pack_nibbles(v.zero, 0)  # [N / 8, groups]
        if actorder == "group":
            out[f"{layer}.weight_g_idx"] = v.g_idx.clone()
        return out

    strategy = {"strategy": "channel", "group_size": None} if group_size == -1 else {
        "group_size": group_size}  # fmt: skip
    quant = dict(ct_quant(symmetric=symmetric, actorder=actorder, **strategy),
                 ignore=list(ignore))  # fmt: skip
    return save_int4(src, folder, quant, make, write)


@pytest.mark.parametrize(
    "group_size,symmetric,actorder,permuted",
    [
        (32, True, None, 0),
        (128, False, None, 0),
        (-1, True, None, 0),  # "channel"
        (-1, False, "weight", 0),  # (actorder weight stores no g_idx)
        (32, False, "group", LAYERS),
        (128, True, "group", 2),  # only down_proj (K 320) has several groups
    ],
)
def test_compressed_tensors_load_exactly_and_generate_the_dequantized_engines_tokens(
    src, tmp_path, group_size, symmetric, actorder, permuted
):
    path, dequantized, layers = save_ct(src, tmp_path, group_size, symmetric=symmetric,
                                        actorder=actorder)  # fmt: skip
    llm = LLM(path, **KW)
    assert llm.engine.runner.config.quantization == "compressed-tensors"
    assert check_loaded_weights(llm.engine.runner.model, layers) == (LAYERS, permuted)
    want = LLM(dequantized, **KW).generate(PROMPTS, PARAMS)
    assert_same_outputs(llm.generate(PROMPTS, PARAMS), want)


def test_ignored_layers_stay_float(src, tmp_path):
    """``ignore`` by name and by regular expression: those layers load float weights."""
    ignore = ("lm_head", "re:.*layers\\.1\\..*", "model.layers.0.mlp.down_proj")
    path, dequantized, layers = save_ct(src, tmp_path, ignore=ignore)
    llm = LLM(path, **KW)
    assert check_loaded_weights(llm.engine.runner.model, layers) == (3, 0)
    want = LLM(dequantized, **KW).generate(PROMPTS[:2], PARAMS)
    assert_same_outputs(llm.generate(PROMPTS[:2], PARAMS), want)


def test_a_merged_layer_quantized_in_part_is_refused(src, tmp_path):
    path, _, _ = save_ct(src, tmp_path, ignore=("lm_head", "model.layers.0.self_attn.k_proj"))
    attn = "model.layers.0.self_attn"
    with pytest.raises(ValueError) as e:
        LLM(path, **KW)
    assert str(e.value) == (
        f"the checkpoint quantizes ['{attn}.q_proj', '{attn}.v_proj'] but not ['{attn}.k_proj'"
        f"], which this engine merges into one layer ({attn}.qkv_proj): quantize all or none "
        "of them"
    )


def test_matches_reads_targets_and_ignore():
    name = "model.layers.3.mlp.down_proj"
    assert matches(name, ("Linear",)) and matches(name, ("re:.*down_proj",))
    assert matches(name, (name,)) and matches(name, ("mlp.down_proj",))
    assert not matches(name, ("re:.*up_proj$",)) and not matches(name, ("proj",))
    assert not matches(name, ())


# ---- refusals, naming the scheme -----------------------------------------------------------------
def config_with(quant: dict) -> SimpleNamespace:
    return SimpleNamespace(quantization_config=quant)


FP8 = {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True}
FP8_TOKENS = {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}
INT8 = {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True}


@pytest.mark.parametrize(
    "quant,message",
    [
        (dict(CT, format="float-quantized", config_groups={"g": dict(
            W4A16, weights=FP8, input_activations=FP8_TOKENS)}),
         r"scheme W8A8 \(format 'float-quantized', weights float 8-bit channel, input "
         r"activations float 8-bit token\) of config group 'g' is not supported: this engine "
         r"loads W4A16 'pack-quantized'"),
        (dict(CT, format="int-quantized", config_groups={"g": dict(
            W4A16, weights=INT8, input_activations=dict(INT8, strategy="token"))}),
         r"scheme W8A8 \(format 'int-quantized', weights int 8-bit channel"),
        (dict(CT, config_groups={"g": dict(W4A16, weights=INT8)}),
         r"scheme W8A16 \(format 'pack-quantized', weights int 8-bit channel, input "
         r"activations not quantized\)"),
        (ct_quant(strategy="tensor"), r"scheme W4A16 \(format 'pack-quantized', weights int "
         r"4-bit tensor"),
        (dict(CT, format="marlin-24"), r"scheme W4A16 \(format 'marlin-24'"),
        (dict(CT, sparsity_config={"format": "sparse-24-bitmask", "sparsity_structure": "2:4"}),
         r"sparsity format 'sparse-24-bitmask' \(sparse weights, e.g. 2:4\) is not supported"),
        (ct_quant(group_size=100), r"compressed-tensors group_size 100 \(config group "
         r"'group_0'\) is not supported: it must be a positive multiple of 16"),
        (ct_quant(actorder="dynamic"), r"compressed-tensors actorder 'dynamic' \(config group"),
        (ct_quant(symmetric="no"), r"compressed-tensors symmetric 'no' must be true or false"),
        (dict(CT, ignore=[]), r"compressed-tensors quantizes lm_head \(targeted, not in "
         r"ignore\): this engine keeps the LM head in the model's dtype"),
        (dict(CT, kv_cache_scheme={"num_bits": 8, "type": "float"}),
         r"compressed-tensors kv_cache_scheme \{'num_bits': 8, 'type': 'float'\} is not "),
        (dict(CT, config_groups={}), r"compressed-tensors config_groups \{\} is not supported"),
        (dict(CT, config_groups={"a": W4A16, "b": dict(
            W4A16, weights=dict(WEIGHTS, group_size=128))}),
         r"compressed-tensors config groups \['a', 'b'\] quantize differently"),
    ],
)  # fmt: skip
def test_schemes_this_engine_cannot_load_are_refused(quant, message):
    for requested in (None, "compressed-tensors"):
        with pytest.raises(ValueError, match=message):
            resolve_quantization(requested, config_with(quant))


def test_resolve_quantization_detects_compressed_tensors():
    assert resolve_quantization(None, config_with(CT)) == "compressed-tensors"
    with pytest.raises(ValueError, match=r"quantization='gptq' loads another format, but this "
                       r"checkpoint is already quantized \(quantization_config quant_method "
                       r"'compressed-tensors'\): pass quantization='compressed"):  # fmt: skip
        resolve_quantization("gptq", config_with(CT))
    with pytest.raises(ValueError, match=r"needs a compressed-tensors checkpoint .* this one "
                       r"has quant_method 'fp8'"):  # fmt: skip
        resolve_quantization("compressed-tensors", config_with({"quant_method": "fp8"}))


@pytest.mark.gpu
def test_gpu_compressed_tensors_engine_equals_dequantized_engine_in_fp32(peaked_llama, tmp_path):
    """Act order by group (the input gather) and channel groups on the Triton kernel
    (prefill, batched and lone decode, CUDA graphs): greedy tokens of the dequantized float
    engine, fp32 on both."""
    from vllm_runner import SamplingParams

    src = peaked_llama(str(tmp_path / "src"), ("embed",), vocab_size=4096, hidden_size=512,
                       intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=1024)  # fmt: skip
    kw = dict(dtype="float32", device="cuda", max_model_len=512, gpu_memory_utilization=0.3)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    prompts = [[(7 * i + j) % 4096 for j in range(5 + 17 * i)] for i in range(8)]
    for sub, group_size, actorder in (("group", 128, "group"), ("channel", -1, None)):
        path, dequantized, _ = save_ct(src, tmp_path / sub, group_size, symmetric=False,
                                       actorder=actorder)  # fmt: skip
        want = [o.outputs[0].token_ids for o in LLM(dequantized, **kw).generate(prompts, params)]
        ct = LLM(path, **kw)
        assert [o.outputs[0].token_ids for o in ct.generate(prompts, params)] == want, sub
        assert ct.generate(prompts[:1], params)[0].outputs[0].token_ids == want[0], sub
