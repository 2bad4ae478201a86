"""The MoE layer's pieces: checkpoint names of either expert layout, the expert weight
loader, routing, and the grouped torch path against a dense per-token loop."""

import pytest
import torch
import torch.nn.functional as F

from kernels import reference
from vllm_runner.model.layers.moe import ExpertNames, FusedMoE, expert_checkpoint_name

MIXTRAL = ExpertNames(gate="w1", up="w3", down="w2", block="block_sparse_moe")
QWEN = ExpertNames()


@pytest.mark.parametrize(
    "name, names, want",
    [
        ("model.layers.3.block_sparse_moe.experts.7.w1.weight", MIXTRAL,
         ("model.layers.3.mlp.experts.w13", ("gate", 7))),
        ("model.layers.3.block_sparse_moe.experts.0.w3.weight", MIXTRAL,
         ("model.layers.3.mlp.experts.w13", ("up", 0))),
        ("model.layers.3.block_sparse_moe.experts.12.w2.weight", MIXTRAL,
         ("model.layers.3.mlp.experts.w2", ("down", 12))),
        ("model.layers.3.block_sparse_moe.gate.weight", MIXTRAL,
         ("model.layers.3.mlp.gate.weight", None)),
        ("model.layers.3.mlp.experts.gate_up_proj", MIXTRAL,  # transformers 5's names
         ("model.layers.3.mlp.experts.w13", None)),
        ("model.layers.3.mlp.experts.down_proj", QWEN, ("model.layers.3.mlp.experts.w2", None)),
        ("model.layers.0.mlp.experts.127.up_proj.weight", QWEN,
         ("model.layers.0.mlp.experts.w13", ("up", 127))),
        ("model.layers.0.mlp.experts.5.down_proj.weight", QWEN,
         ("model.layers.0.mlp.experts.w2", ("down", 5))),
        # not an expert's: left to the packed-module mapping (None)
        ("model.layers.0.mlp.gate_proj.weight", QWEN, None),  # a dense layer's MLP
        ("model.layers.0.mlp.shared_expert.up_proj.weight", QWEN, None),
        ("model.layers.0.mlp.gate.weight", QWEN, None),
        ("model.layers.0.self_attn.q_proj.weight", MIXTRAL, None),
    ],
)  # fmt: skip
def test_expert_checkpoint_names(name, names, want):
    assert expert_checkpoint_name(name, names) == want


def test_expert_loader_places_each_part():
    """Per-expert tensors and stacked ones fill the same rows: w13[e] = [gate_e; up_e]."""
    experts = FusedMoE(num_experts=3, hidden=4, inter=2)
    gate = torch.arange(3 * 2 * 4.0).view(3, 2, 4)
    up = -gate
    down = torch.arange(3 * 4 * 2.0).view(3, 4, 2) + 100
    for e in range(3):
        experts.weight_loader(experts.w13, gate[e], ("gate", e))
        experts.weight_loader(experts.w13, up[e], ("up", e))
        experts.weight_loader(experts.w2, down[e], ("down", e))
    assert torch.equal(experts.w13.data, torch.cat([gate, up], dim=1))
    assert torch.equal(experts.w2.data, down)
    stacked = FusedMoE(num_experts=3, hidden=4, inter=2)
    stacked.weight_loader(stacked.w13, torch.cat([gate, up], dim=1), None)
    stacked.weight_loader(stacked.w2, down, None)
    assert torch.equal(stacked.w13.data, experts.w13.data)
    assert torch.equal(stacked.w2.data, experts.w2.data)
    with pytest.raises(ValueError, match=r"^has shape \(3, 2, 4\), \(3, 4, 4\) expected$"):
        stacked.weight_loader(stacked.w13, gate, None)
    assert experts.checkpoint_shards("w2") == [("down", 0), ("down", 1), ("down", 2)]


def test_rank_1_of_2_keeps_its_inter_features_of_every_expert(monkeypatch):
    """Tensor parallel: rank 1 of 2 keeps the second half of each expert's gate rows, of its
    up rows and of its down columns, from per-expert and from stacked tensors alike."""
    from vllm_runner.model.layers import moe, parallel

    for module in (moe, parallel):
        monkeypatch.setattr(module, "tp_size", lambda: 2)
    monkeypatch.setattr(parallel, "tp_rank", lambda: 1)
    gate = torch.arange(2 * 4 * 3.0).view(2, 4, 3)  # 2 experts, inter 4, hidden 3
    up, down = gate + 100, torch.arange(2 * 3 * 4.0).view(2, 3, 4)
    apart, stacked = FusedMoE(2, 3, 4), FusedMoE(2, 3, 4)
    assert apart.w13.shape == (2, 4, 3) and apart.w2.shape == (2, 3, 2)
    for e in range(2):
        apart.weight_loader(apart.w13, gate[e], ("gate", e))
        apart.weight_loader(apart.w13, up[e], ("up", e))
        apart.weight_loader(apart.w2, down[e], ("down", e))
    stacked.weight_loader(stacked.w13, torch.cat([gate, up], dim=1))
    stacked.weight_loader(stacked.w2, down)
    want = torch.cat([gate[:, 2:], up[:, 2:]], dim=1)
    for experts in (apart, stacked):
        assert torch.equal(experts.w13.data, want)
        assert torch.equal(experts.w2.data, down[:, :, 2:])


def test_routing_picks_the_top_k_and_renormalizes():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]])
    probs = logits.softmax(-1)
    weights, ids = reference.moe_route(logits, 2, renormalize=False)
    assert ids.tolist() == [[1, 2]]
    torch.testing.assert_close(weights, probs[:, [1, 2]], rtol=0, atol=0)
    weights, _ = reference.moe_route(logits, 2, renormalize=True)
    torch.testing.assert_close(weights, probs[:, [1, 2]] / probs[:, [1, 2]].sum(), rtol=0, atol=0)


def _dense_loop(x, w13, w2, weights, ids):
    """Token by token, expert by expert, in k order."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            gate, up = (x[t] @ w13[e].T).chunk(2)
            out[t] = out[t] + weights[t, k] * ((F.silu(gate) * up) @ w2[e].T)
    return out


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_grouped_path_equals_a_dense_per_token_loop_exactly(top_k):
    """fp64, values where every sum is exact whatever its order (integer x and w13, w2 with
    one integer per row): the grouping, the scatter back and the weighted sum over k are
    the only things compared, bit for bit. 8 experts, some unused by 13 tokens."""
    torch.manual_seed(0)
    num_tokens, hidden, inter, num_experts = 13, 16, 12, 8
    x = torch.randint(-3, 4, (num_tokens, hidden)).double()
    w13 = torch.randint(-2, 3, (num_experts, 2 * inter, hidden)).double()
    w2 = torch.zeros(num_experts, hidden, inter, dtype=torch.float64)
    cols = torch.randint(0, inter, (num_experts, hidden, 1))
    w2.scatter_(2, cols, torch.randint(1, 4, (num_experts, hidden, 1)).double())
    logits = torch.randn(num_tokens, num_experts, dtype=torch.float64)
    logits[:, 6:] -= 100  # experts 6 and 7 unused
    weights, ids = reference.moe_route(logits, top_k, renormalize=True)
    weights = weights.double()
    out = reference.fused_moe(x, w13, w2, weights, ids)
    assert torch.equal(out, _dense_loop(x, w13, w2, weights, ids))


def test_grouped_path_matches_the_dense_loop_on_random_weights():
    torch.manual_seed(1)
    x = torch.randn(21, 32, dtype=torch.float64)
    w13 = torch.randn(6, 80, 32, dtype=torch.float64)
    w2 = torch.randn(6, 32, 40, dtype=torch.float64)
    weights, ids = reference.moe_route(torch.randn(21, 6), 3, renormalize=False)
    weights = weights.double()
    torch.testing.assert_close(
        reference.fused_moe(x, w13, w2, weights, ids),
        _dense_loop(x, w13, w2, weights, ids), rtol=1e-12, atol=1e-12,
    )  # fmt: skip
