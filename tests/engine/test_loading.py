"""Loading models on CPU: bad paths, checkpoint shapes and index files, unsupported
activations."""

import re

import pytest
import torch
from engine_testing import GREEDY, make_llm

from vllm_runner import LLM


def test_bad_model_paths(tmp_path):
    with pytest.raises(ValueError, match="not a local model folder"):
        LLM(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="not in the local Hugging Face cache"):
        LLM("nobody/no-such-model")
    (tmp_path / "config.json").write_text(
        '{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}'
    )
    with pytest.raises(ValueError, match="unsupported model architecture"):
        LLM(str(tmp_path))


@pytest.mark.parametrize(
    "tensor, shape",
    [
        ("model.layers.0.input_layernorm.weight", (1,)),  # was broadcast
        ("model.layers.0.self_attn.q_proj.weight", (128, 64)),  # was cut to the first rows
        ("model.layers.0.mlp.down_proj.weight", (64, 256)),
        ("model.layers.0.mlp.gate_proj.weight", (128, 1)),
        ("model.embed_tokens.weight", (500, 64)),
    ],
)
def test_checkpoint_tensor_of_another_shape_is_refused(llama_dir, tmp_path, tensor, shape):
    """A checkpoint whose tensor does not match the model's shape fails to load, naming
    the tensor and both shapes, instead of loading into garbage."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    shutil.copytree(llama_dir, folder)
    (weights,) = folder.glob("*.safetensors")
    tensors = load_file(weights)
    want = tuple(tensors[tensor].shape)
    tensors[tensor] = torch.randn(shape)
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{tensor}' has shape {re.escape(str(shape))}, "
                       rf"{re.escape(str(want))} expected"):  # fmt: skip
        make_llm(str(folder))


def test_only_the_files_of_the_index_load(llama_dir, tmp_path):
    """A folder holding a sharded checkpoint's index and another safetensors file (Mistral's
    hub repos ship ``consolidated.safetensors`` in their own naming next to the HF shards)
    loads the indexed shards only, as HF and vLLM do."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    shutil.copytree(llama_dir, folder)
    (weights,) = folder.glob("*.safetensors")
    tensors = load_file(weights)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}  # fmt: skip
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, folder / file, metadata={"format": "pt"})
    weight_map = {n: file for file, part in shards.items() for n in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    weights.rename(folder / "consolidated.safetensors")  # HF names, but not in the index
    save_file({"layers.0.attention.wq.weight": torch.randn(4, 4)},
              folder / "consolidated.safetensors")  # fmt: skip
    prompt = [[5, 17, 42, 99, 3]]
    want = make_llm(llama_dir).generate(prompt, GREEDY)[0].token_ids
    assert make_llm(str(folder)).generate(prompt, GREEDY)[0].token_ids == want


@pytest.mark.parametrize(
    "family, field, value",
    [
        ("llama", "hidden_act", "gelu_pytorch_tanh"),
        ("qwen2", "hidden_act", "relu"),
        ("opt", "activation_function", "tanh"),
    ],
)
def test_an_activation_the_model_does_not_run_is_refused(
    tiny_model_dirs, tmp_path, family, field, value
):
    """Llama-family MLPs run SiLU in fused kernels: another hidden_act loaded silently and
    generated SiLU's tokens; OPT's unknown activations were a bare KeyError."""
    import json
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dirs[family], folder)
    config = json.loads((folder / "config.json").read_text())
    config[field] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"{field} '{value}' is not supported.*silu"):
        make_llm(str(folder))


def test_layers_share_one_rotary_table(llama_dir):
    """Every decoder layer reads the same cos/sin table: one [max_positions, head_dim] fp32
    table a layer was 512 MiB of copies for Llama-3.2-1B's 16 layers at 128k positions."""
    model = make_llm(llama_dir).engine.runner.model
    tables = [layer.self_attn.rotary_emb.cos_sin_cache for layer in model.model.layers]
    assert len(tables) > 1
    assert len({t.data_ptr() for t in tables}) == 1


def _edited_copy(source: str, folder, config=None, tensors=None) -> str:
    """``source`` copied to ``folder``, its config.json and checkpoint edited in place."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, folder)
    if config is not None:
        data = json.loads((folder / "config.json").read_text())
        config(data)
        (folder / "config.json").write_text(json.dumps(data))
    if tensors is not None:
        weights = folder / "model.safetensors"
        data = load_file(weights)
        tensors(data)
        save_file(data, weights, metadata={"format": "pt"})
    return str(folder)


def _no_architectures(config: dict) -> None:
    del config["architectures"]


def _llama1_spelling(config: dict) -> None:  # decapoda-research/llama-7b-hf and its fine-tunes
    config["architectures"] = ["LLaMAForCausalLM"]


def _rotary_caches(tensors: dict) -> None:
    tensors["model.layers.0.self_attn.rotary_emb.cos_cached"] = torch.randn(512, 16)
    tensors["model.layers.0.self_attn.rotary_emb.sin_cached"] = torch.randn(512, 16)


def _head_not_embedding(tensors: dict) -> None:  # a tied checkpoint storing the head only
    tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")


@pytest.mark.parametrize(
    "family, config, tensors, extra_file",
    [
        ("llama", _no_architectures, None, False),  # transformers reads model_type then
        ("opt", _no_architectures, None, False),
        ("llama", _llama1_spelling, None, False),  # transformers reads model_type "llama"
        ("llama", None, _rotary_caches, False),  # old checkpoints: derived, skipped
        ("qwen2", None, _head_not_embedding, False),
        ("llama", None, None, True),  # an adapter's file next to model.safetensors
    ],
)
def test_folders_transformers_loads_load_the_same(
    tiny_model_dirs, tmp_path, family, config, tensors, extra_file
):
    from safetensors.torch import save_file

    folder = _edited_copy(tiny_model_dirs[family], tmp_path / "model", config, tensors)
    if extra_file:
        save_file({"base_model.model.lora_A.weight": torch.randn(4, 4)},
                  tmp_path / "model" / "adapter_model.safetensors")  # fmt: skip
    prompt = [[5, 17, 42, 99, 3]]
    want = make_llm(tiny_model_dirs[family]).generate(prompt, GREEDY)[0].token_ids
    assert make_llm(folder).generate(prompt, GREEDY)[0].token_ids == want


def test_a_tensor_the_model_lacks_is_named_as_the_checkpoint_stores_it(llama_dir, tmp_path):
    """A q_proj bias the config does not build was reported as 'qkv_proj.bias', a name the
    checkpoint does not hold (our fused parameter's)."""

    def q_bias(tensors: dict) -> None:
        tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)

    folder = _edited_copy(llama_dir, tmp_path / "model", tensors=q_bias)
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj.bias' matches no"):
        make_llm(folder)


def test_a_pre_quantized_checkpoint_is_refused_naming_why(llama_dir, tmp_path):
    """An FP8 / AWQ / GPTQ checkpoint (Llama, Qwen2 and Mistral ship many) failed on its first
    scale tensor, with no word of quantization."""

    def fp8_config(config: dict) -> None:
        config["quantization_config"] = {"quant_method": "fp8"}

    def fp8_tensors(tensors: dict) -> None:
        for name in [n for n in tensors if n.endswith("_proj.weight")]:
            tensors[name] = tensors[name].to(torch.float8_e4m3fn)
            tensors[name.replace(".weight", ".weight_scale")] = torch.ones(1)

    folder = _edited_copy(llama_dir, tmp_path / "model", fp8_config, fp8_tensors)
    with pytest.raises(ValueError, match=r"weight_scale' matches no parameter .* pre-quantized "
                       r"\(quantization_config quant_method 'fp8'\)"):  # fmt: skip
        make_llm(folder)


def test_a_model_type_not_supported_is_named(llama_dir, tmp_path):
    def gpt2(config: dict) -> None:
        del config["architectures"]
        config["model_type"] = "gpt2"

    folder = _edited_copy(llama_dir, tmp_path / "model", gpt2)
    with pytest.raises(
        ValueError, match=r"unsupported model type 'gpt2' \(config.json names no architectures\)"
    ):
        make_llm(folder)


def test_offloading_on_the_cpu_warns(llama_dir, caplog):
    make_llm(llama_dir, cpu_offload_gb=0.001)
    assert "cpu_offload_gb on the CPU saves no memory" in caplog.text


@pytest.mark.parametrize(
    "family, dropped",
    [
        ("llama", ["model.layers.0.self_attn.k_proj.weight"]),
        ("llama", ["model.layers.1.mlp.up_proj.weight"]),
        ("qwen2", ["model.layers.0.self_attn.v_proj.bias"]),
        ("qwen2", [f"model.layers.1.self_attn.{p}_proj.bias" for p in "qkv"]),
        ("llama", ["model.norm.weight"]),
    ],
)
def test_a_tensor_the_checkpoint_lacks_is_named(tiny_model_dirs, tmp_path, family, dropped):
    """A checkpoint lacking one part of a fused parameter (k_proj of qkv_proj, up_proj of
    gate_up_proj) loaded, that part left as uninitialised memory; all parts missing were
    named by our fused name ('qkv_proj.bias'), which the checkpoint never holds."""

    def drop(tensors: dict) -> None:
        for name in dropped:
            del tensors[name]

    folder = _edited_copy(tiny_model_dirs[family], tmp_path / "model", tensors=drop)
    with pytest.raises(ValueError, match=rf"checkpoint lacks {len(dropped)} tensors") as error:
        make_llm(folder)
    assert all(f"'{name}'" in str(error.value) for name in dropped)


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("adapter", [False, True])
def test_a_bin_checkpoint_loads_as_transformers_loads_it(llama_dir, tmp_path, sharded, adapter):
    """``pytorch_model.bin`` (or its shards and index) as the weights; with an adapter's
    safetensors file next to them (transformers loads the .bin: it never reads other
    safetensors names) the adapter's tensors were loaded instead and refused."""
    import json

    from safetensors.torch import load_file, save_file

    def to_bin(tensors: dict) -> None:
        names = sorted(tensors)
        parts = {"pytorch_model.bin": names}
        if sharded:
            parts = {"pytorch_model-00001-of-00002.bin": names[::2],
                     "pytorch_model-00002-of-00002.bin": names[1::2]}  # fmt: skip
            weight_map = {n: file for file, part in parts.items() for n in part}
            index = {"metadata": {}, "weight_map": weight_map}
            (tmp_path / "model" / "pytorch_model.bin.index.json").write_text(json.dumps(index))
        for file, part in parts.items():
            torch.save({n: tensors[n] for n in part}, tmp_path / "model" / file)

    folder = _edited_copy(llama_dir, tmp_path / "model")
    to_bin(load_file(tmp_path / "model" / "model.safetensors"))
    (tmp_path / "model" / "model.safetensors").unlink()
    if adapter:
        save_file({"base_model.model.lora_A.weight": torch.randn(4, 4)},
                  tmp_path / "model" / "adapter_model.safetensors")  # fmt: skip
    prompt = [[5, 17, 42, 99, 3]]
    want = make_llm(llama_dir).generate(prompt, GREEDY)[0].token_ids
    assert make_llm(folder).generate(prompt, GREEDY)[0].token_ids == want
    if sharded:  # a shard its index names, missing: named
        (tmp_path / "model" / "pytorch_model-00002-of-00002.bin").unlink()
        with pytest.raises(ValueError, match=r"names \['pytorch_model-00002-of-00002.bin'\], not"):
            make_llm(folder)


def test_a_model_of_custom_code_is_refused_without_asking(llama_dir, tmp_path, monkeypatch):
    """A config whose model_type only its repository's code defines (auto_map) made
    transformers ask on stdin, for 15 s, whether to run that code (and run it on 'y'); the
    error then told the user to pass trust_remote_code=True, which the engine refuses. A
    tokenizer of its repository's code: asked too; now none (token ids only)."""
    import builtins
    import json

    def custom(config: dict) -> None:
        config["model_type"] = "custom_llama"
        config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig"}

    folder = _edited_copy(llama_dir, tmp_path / "model", custom)
    (tmp_path / "model" / "configuration_custom.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass CustomConfig(LlamaConfig):\n"
        "    model_type = 'custom_llama'\n"
    )
    asked = []
    monkeypatch.setattr(builtins, "input", lambda prompt="": asked.append(prompt) or "y")
    with pytest.raises(ValueError, match=r"model_type 'custom_llama', .* never runs") as error:
        make_llm(folder)
    assert not asked
    assert "trust_remote_code=True" not in str(error.value)

    folder = _edited_copy(llama_dir, tmp_path / "tokenizer")
    auto_map = {"AutoTokenizer": ["tok.CustomTok", None]}
    config = {"tokenizer_class": "CustomTok", "auto_map": auto_map}
    (tmp_path / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "tokenizer" / "tok.py").write_text("raise RuntimeError('repository code ran')\n")
    assert make_llm(folder).get_tokenizer() is None
    assert not asked


def test_a_single_safetensors_file_wins_over_a_stale_index(llama_dir, tmp_path):
    """``model.safetensors`` next to an index whose shards are absent (shards merged into
    one file, the index left behind): transformers loads the single file, which it checks
    first; the engine read the index and refused the folder for its absent shards."""
    import json

    folder = _edited_copy(llama_dir, tmp_path / "model")
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}
    (tmp_path / "model" / "model.safetensors.index.json").write_text(json.dumps(index))
    prompt = [[5, 17, 42, 99, 3]]
    want = make_llm(llama_dir).generate(prompt, GREEDY)[0].token_ids
    assert make_llm(folder).generate(prompt, GREEDY)[0].token_ids == want
