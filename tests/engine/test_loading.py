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
