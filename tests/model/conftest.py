"""Fixtures of the GPU model tests."""

import pytest
import torch


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A random model of SmolLM2-135M's shape (the device machine cannot install the real one)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if not torch.cuda.is_available():
        pytest.fail("the gpu suite needs a CUDA device")
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        rope_theta=100000.0,
        architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():  # peaked logits (a large tied embedding), so greedy is not a coin toss
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 1.0 if "embed" in name else 0.05)
    path = str(tmp_path_factory.mktemp("smol_shape"))
    model.save_pretrained(path)
    return path
