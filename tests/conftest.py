"""Shared fixtures: tiny random HF models saved to disk, and the default model on CPU."""

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _tiny_config(family: str):
    from transformers import LlamaConfig, OPTConfig, Qwen2Config

    if family == "llama":
        return LlamaConfig(
            vocab_size=384,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            architectures=["LlamaForCausalLM"],
        )
    if family == "qwen2":
        return Qwen2Config(
            vocab_size=384,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            architectures=["Qwen2ForCausalLM"],
        )
    if family == "opt":
        return OPTConfig(
            vocab_size=384,
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=512,
            word_embed_proj_dim=64,
            architectures=["OPTForCausalLM"],
        )
    raise ValueError(family)


def build_tiny_model(family: str, path: str, seed: int = 0):
    """A random HF model of ``family`` saved as safetensors (no tokenizer) in ``path``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_tiny_config(family), dtype=torch.float32)
    # Random init is near-uniform: widen the weights so greedy choices are well separated.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    model.eval().save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, str]:
    dirs = {}
    for family in ("llama", "qwen2", "opt"):
        path = str(tmp_path_factory.mktemp(family))
        build_tiny_model(family, path)
        dirs[family] = path
    return dirs


@pytest.fixture(scope="session")
def default_model_dir() -> str:
    from vllm_runner.model.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def smol_llm(default_model_dir):
    from vllm_runner import LLM

    return LLM(
        default_model_dir, dtype="float32", device="cpu", max_model_len=1024, cpu_kv_cache_gb=0.25
    )
