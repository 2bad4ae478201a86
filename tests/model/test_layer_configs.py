"""Config handling of the model layers, checked against HF transformers without an engine:
rotary tables of YaRN settings the engine tests leave at their defaults, the positions a
rope scaling serves, OPT's activations and the shape check of checkpoint tensors."""

from types import SimpleNamespace

import pytest
import torch

from vllm_runner.model.layers.parallel import load_shard
from vllm_runner.model.layers.rotary import rope_max_positions
from vllm_runner.model.llama import llama_rotary


def _llama_config(max_positions: int, rope: dict):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=max_positions,
                       rope_parameters={"rope_theta": 10000.0, **rope})  # fmt: skip


@pytest.mark.parametrize(
    "yarn",
    [
        # a long original context: beta_fast's default (32) picks the ramp's first dimension
        {"factor": 4.0, "original_max_position_embeddings": 4096},
        # mscale without mscale_all_dim: the attention factor is the default one
        {"factor": 4.0, "original_max_position_embeddings": 128, "mscale": 0.707},
        # an untruncated ramp narrower than one dimension
        {"factor": 4.0, "original_max_position_embeddings": 4096, "beta_fast": 2,
         "beta_slow": 1, "truncate": False},
    ],
)  # fmt: skip
def test_yarn_tables_match_hf(yarn):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = _llama_config(4096, {"rope_type": "yarn", **yarn})
    table = llama_rotary(config).cos_sin_cache
    cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1), torch.arange(1024)[None])
    half = table.shape[1] // 2
    torch.testing.assert_close(table[:1024, :half], cos[0, :, :half], rtol=0, atol=5e-5)
    torch.testing.assert_close(table[:1024, half:], sin[0, :, :half], rtol=0, atol=5e-5)


@pytest.mark.parametrize(
    "scaling",
    [
        # YaRN whose extended context (128 x 2) is below max_position_embeddings
        {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128},
        {"type": "linear", "factor": 0.5},  # a factor below 1 never shortens the context
        {"rope_type": "dynamic", "factor": 4.0},
    ],
)
def test_a_scaling_never_serves_fewer_than_max_position_embeddings(scaling):
    config = SimpleNamespace(max_position_embeddings=512, rope_scaling=scaling)
    assert rope_max_positions(config) == 512


def test_positions_default_to_2048_without_max_position_embeddings():
    assert rope_max_positions(SimpleNamespace()) == 2048


def test_an_unsupported_rope_type_is_named():
    """Qwen2-VL's multimodal rope: refused, naming the types served."""
    config = SimpleNamespace(
        hidden_size=64,
        num_attention_heads=4,
        max_position_embeddings=512,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
    )
    with pytest.raises(
        ValueError,
        match=r"^rope_scaling type 'mrope' is not supported "
        r"\(supported: default, dynamic, linear, llama3, longrope, yarn\)$",
    ):
        llama_rotary(config)


@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_new", "silu"])
def test_opt_activations_are_hfs(act):
    from transformers import OPTConfig
    from transformers.activations import ACT2FN

    from vllm_runner.model.opt import OPTDecoderLayer

    config = OPTConfig(vocab_size=384, hidden_size=64, ffn_dim=128, num_hidden_layers=1,
                       num_attention_heads=4, activation_function=act)  # fmt: skip
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    torch.testing.assert_close(OPTDecoderLayer(config).act(x), ACT2FN[act](x), rtol=0, atol=1e-12)


def test_a_transposed_checkpoint_tensor_is_refused_naming_both_shapes():
    """Same element count, other shape: refused before any copy, never reshaped."""
    dst = torch.zeros(4, 8)
    with pytest.raises(ValueError, match=r"^has shape \(8, 4\), \(4, 8\) expected$"):
        load_shard(dst, torch.ones(8, 4))
    assert not dst.any()


def test_the_last_ranks_vocab_shard_is_padded_with_zeros_and_cut_from_the_logits(monkeypatch):
    """Rank 1 of 2 over a vocabulary of 5: it holds ids 3 and 4 and one zero pad row; other
    ranks' ids embed to zeros there; the gathered logits (6 columns) are cut to the 5 ids."""
    from vllm_runner.model.layers import embedding

    monkeypatch.setattr(embedding, "tp_size", lambda: 2)
    monkeypatch.setattr(embedding, "tp_rank", lambda: 1)
    # rank 0's logits (zeros here) before this rank's, as the all-gather concatenates them
    monkeypatch.setattr(
        embedding, "all_gather_last_dim", lambda x: torch.cat([torch.zeros_like(x), x], -1)
    )
    head = embedding.ParallelLMHead(5, 3)
    head.weight.data.fill_(float("nan"))  # what torch.empty may hold
    full = torch.arange(15, dtype=torch.float32).reshape(5, 3)
    head.weight_loader(head.weight, full)
    torch.testing.assert_close(head.weight.data, torch.cat([full[3:], torch.zeros(1, 3)]))
    embedded = head(torch.tensor([0, 3, 4, 2]))
    torch.testing.assert_close(
        embedded, torch.stack([torch.zeros(3), full[3], full[4], torch.zeros(3)])
    )
    hidden = torch.tensor([[1.0, 0.0, -1.0]])
    logits = head.compute_logits(hidden)
    assert logits.shape == (1, 5)
    torch.testing.assert_close(logits[:, 3:], hidden @ full[3:].T)


def test_fused_checkpoint_tensors_load_each_ranks_rows(monkeypatch):
    """Phi-3 stores qkv_proj and gate_up_proj fused: rank 1 of 2 keeps its heads of q, of k
    and of v (its rows of gate and of up), as from the same tensors stored apart (Llama's
    q_proj, ...); a fused tensor of another size is refused naming both shapes."""
    from vllm_runner.model.layers import linear, parallel

    for module in (linear, parallel):
        monkeypatch.setattr(module, "tp_size", lambda: 2)
    monkeypatch.setattr(parallel, "tp_rank", lambda: 1)
    full = torch.arange(48, dtype=torch.float32).reshape(16, 3)  # q: 4 heads of 2, k, v: 2
    q, k, v = full.split([8, 4, 4])
    fused = linear.QKVParallelLinear(3, 2, 4, 2)
    fused.weight_loader(fused.weight, full)
    torch.testing.assert_close(fused.weight.data, torch.cat([q[4:], k[2:], v[2:]]))
    apart = linear.QKVParallelLinear(3, 2, 4, 2)
    for shard_id, part in zip("qkv", (q, k, v), strict=True):
        apart.weight_loader(apart.weight, part, shard_id)
    assert torch.equal(apart.weight, fused.weight)
    gate_up = linear.MergedColumnParallelLinear(3, [6, 6])
    gate_up.weight_loader(gate_up.weight, full[:12])
    torch.testing.assert_close(gate_up.weight.data, torch.cat([full[3:6], full[9:12]]))
    with pytest.raises(ValueError, match=r"^has shape \(15, 3\), \(16, 3\) expected$"):
        fused.weight_loader(fused.weight, full[:15])
