"""The loader's pieces, exactly: model paths, which checkpoint files load, weights by name,
architectures to classes."""

import json
import os
from types import SimpleNamespace

import pytest
import torch

from vllm_runner.model.llama import LlamaForCausalLM
from vllm_runner.model.loader import (
    _instantiate,
    checkpoint_files,
    load_weights,
    resolve_model_path,
)
from vllm_runner.model.mixtral import MixtralForCausalLM
from vllm_runner.model.olmoe import OlmoeForCausalLM
from vllm_runner.model.opt import OPTForCausalLM
from vllm_runner.model.phi3 import Phi3ForCausalLM
from vllm_runner.model.qwen2 import Qwen2ForCausalLM
from vllm_runner.model.qwen3 import Qwen3ForCausalLM
from vllm_runner.model.qwen_moe import Qwen2MoeForCausalLM, Qwen3MoeForCausalLM
from vllm_runner.model.registry import resolve_model_class
from vllm_runner.tokenizer import load_hf_config

NOT_LOCAL = "is not a local model folder (config.json + weights) nor a hub id ('org/name')"


# ---- model paths -------------------------------------------------------------------------------
def test_a_relative_model_folder_resolves_to_its_absolute_path(tmp_path, monkeypatch):
    """A shared engine's front ends load the tokenizer from this path, from their own working
    directories: it must not stay relative."""
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "models" / "tiny" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path / "models")
    assert resolve_model_path("tiny") == str(tmp_path / "models" / "tiny")
    assert resolve_model_path("./tiny") == str(tmp_path / "models" / "tiny")


def test_a_folder_without_config_json_is_named(tmp_path):
    with pytest.raises(ValueError) as error:
        resolve_model_path(str(tmp_path))
    assert str(error.value) == f"model folder {str(tmp_path)!r} has no config.json"


@pytest.mark.parametrize("model", ["llama", "~/llama", "org/name/extra", "./org"])
def test_a_name_that_is_no_hub_id_is_not_looked_up(model, tmp_path, monkeypatch):
    """Not 'org/name' (or a path by its look): refused as not local, never a cache lookup."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as error:
        resolve_model_path(model)
    assert str(error.value).startswith(f"model {model!r} {NOT_LOCAL}")


def test_a_file_in_the_form_of_a_hub_id_is_not_looked_up(tmp_path, monkeypatch):
    """A GGUF file path 'models/x.gguf' reads like 'org/name': it is a file, not a folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "x.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError) as error:
        resolve_model_path("models/x.gguf")
    assert str(error.value).startswith(f"model 'models/x.gguf' {NOT_LOCAL}")


# ---- which files load --------------------------------------------------------------------------
def _files(folder, *names: str) -> str:
    for name in names:
        (folder / name).write_bytes(b"")
    return str(folder)


def _names(files: list[str]) -> list[str]:
    return [os.path.basename(f) for f in files]


def test_model_safetensors_wins_over_pytorch_model_bin(tmp_path):
    """transformers loads safetensors when a folder holds both (hub repos often do)."""
    folder = _files(tmp_path, "pytorch_model.bin", "model.safetensors")
    assert _names(checkpoint_files(folder)) == ["model.safetensors"]


def test_unindexed_bin_shards_load_without_other_bin_files(tmp_path):
    """Shards saved without an index: the pytorch_model*.bin files only, never a trainer's
    training_args.bin or optimizer.bin next to them."""
    shards = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    folder = _files(tmp_path, "training_args.bin", "optimizer.bin", *shards)
    assert _names(checkpoint_files(folder)) == shards


def test_unindexed_safetensors_load_all_sorted(tmp_path):
    folder = _files(tmp_path, "weights-2.safetensors", "weights-1.safetensors", "x.bin")
    assert _names(checkpoint_files(folder)) == ["weights-1.safetensors", "weights-2.safetensors"]


def test_an_index_names_its_shards_once_and_its_first_absent_ones(tmp_path):
    weight_map = {f"t{i}": f"model-{i % 5:05d}.safetensors" for i in range(20)}
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    _files(tmp_path, "model-00000.safetensors")
    with pytest.raises(ValueError) as error:
        checkpoint_files(str(tmp_path))
    absent = ["model-00001.safetensors", "model-00002.safetensors", "model-00003.safetensors"]
    assert str(error.value) == f"{index} names {absent}, not in the folder"
    _files(tmp_path, *(f"model-{i:05d}.safetensors" for i in range(1, 5)))
    want = [f"model-{i:05d}.safetensors" for i in range(5)]
    assert _names(checkpoint_files(str(tmp_path))) == want


def test_a_folder_without_weights_is_named(tmp_path):
    folder = _files(tmp_path, "config.json", "training_args.bin")
    with pytest.raises(ValueError) as error:
        checkpoint_files(folder)
    assert str(error.value) == f"model folder {folder!r} has no *.safetensors or pytorch_model*.bin"


# ---- weights by name ---------------------------------------------------------------------------
def _state(family: str, tiny_model_dirs) -> tuple[object, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    path = tiny_model_dirs[family]
    return load_hf_config(path), load_file(os.path.join(path, "model.safetensors"))


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_a_tied_head_stored_after_the_embedding_does_not_replace_it(tiny_model_dirs):
    """A tied checkpoint holding both (the head in a later shard, of other values): the
    embedding's values load, as transformers ties the head to the embedding."""
    config, tensors = _state("qwen2", tiny_model_dirs)
    embedding = tensors["model.embed_tokens.weight"]
    model = _instantiate(config, torch.float32, torch.device("cpu"))
    load_weights(model, iter([*tensors.items(), ("lm_head.weight", embedding + 1.0)]))
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_an_old_opt_checkpoint_without_the_model_prefix_loads(tiny_model_dirs):
    """facebook/opt-* checkpoints name 'decoder.layers.0...', not 'model.decoder...'."""
    config, tensors = _state("opt", tiny_model_dirs)
    model = _instantiate(config, torch.float32, torch.device("cpu"))
    load_weights(model, iter(tensors.items()))
    want = _params(model)
    old = _instantiate(config, torch.float32, torch.device("cpu"))
    load_weights(old, ((n.removeprefix("model."), t) for n, t in tensors.items()))
    got = _params(old)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_building_a_model_leaves_the_default_dtype_as_it_was(tiny_model_dirs):
    config, _ = _state("llama", tiny_model_dirs)
    before = torch.get_default_dtype()
    model = _instantiate(config, torch.bfloat16, torch.device("meta"))
    assert model.model.norm.weight.dtype == torch.bfloat16
    assert torch.get_default_dtype() == before


def test_swish_is_silu_to_a_llama(tiny_model_dirs):
    """transformers' ACT2FN maps 'swish' to SiLU: such a config loads, it is not refused."""
    config, _ = _state("llama", tiny_model_dirs)
    config.hidden_act = "swish"
    assert isinstance(_instantiate(config, torch.float32, torch.device("meta")), LlamaForCausalLM)


# ---- architectures -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "model_type, cls",
    [("llama", LlamaForCausalLM), ("mistral", LlamaForCausalLM),
     ("qwen2", Qwen2ForCausalLM), ("qwen3", Qwen3ForCausalLM), ("phi3", Phi3ForCausalLM),
     ("opt", OPTForCausalLM), ("mixtral", MixtralForCausalLM),
     ("qwen2_moe", Qwen2MoeForCausalLM), ("qwen3_moe", Qwen3MoeForCausalLM),
     ("olmoe", OlmoeForCausalLM)],
)  # fmt: skip
def test_a_config_without_architectures_resolves_by_model_type(model_type, cls):
    assert resolve_model_class(SimpleNamespace(model_type=model_type)) is cls
    assert resolve_model_class(SimpleNamespace(model_type=model_type, architectures=[])) is cls


def test_the_first_supported_architecture_listed_is_used():
    config = SimpleNamespace(architectures=["GPT2Model", "Qwen2ForCausalLM"], model_type="x")
    assert resolve_model_class(config) is Qwen2ForCausalLM


def test_an_unsupported_architecture_names_what_is_supported():
    config = SimpleNamespace(architectures=["GPT2LMHeadModel", "Foo"], model_type="llama")
    with pytest.raises(ValueError) as error:
        resolve_model_class(config)
    assert str(error.value) == (
        "unsupported model architecture ['GPT2LMHeadModel', 'Foo']; supported architectures: "
        "['Gemma2ForCausalLM', 'Gemma3ForCausalLM', 'LLaMAForCausalLM', 'LlamaForCausalLM', "
        "'LlamaModel', 'MistralForCausalLM', 'MistralModel', 'MixtralForCausalLM', "
        "'OPTForCausalLM', 'OlmoeForCausalLM', 'Phi3ForCausalLM', 'Qwen2ForCausalLM', "
        "'Qwen2Model', 'Qwen2MoeForCausalLM', 'Qwen3ForCausalLM', 'Qwen3Model', "
        "'Qwen3MoeForCausalLM'], model types: "
        "['gemma2', 'gemma3_text', 'llama', 'mistral', 'mixtral', 'olmoe', 'opt', 'phi3', "
        "'qwen2', 'qwen2_moe', 'qwen3', 'qwen3_moe']"
    )
