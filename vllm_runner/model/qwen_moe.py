"""Qwen3-MoE and Qwen2-MoE: the Qwen3 / Qwen2 attention with a mixture of experts in the
layers that ``decoder_sparse_step`` and ``mlp_only_layers`` pick (a dense MLP of
``intermediate_size`` in the others), experts of ``moe_intermediate_size``, the top-k
weights renormalized when ``norm_topk_prob``. Qwen2-MoE adds a shared expert every token
runs, scaled by ``sigmoid(shared_expert_gate(x))``."""

import functools

from torch import nn

from vllm_runner.model.layers.moe import ExpertCheckpoint, SparseMoeBlock, check_moe_config
from vllm_runner.model.llama import LlamaForCausalLM, LlamaLayout, LlamaMLP


def is_sparse_layer(config, index: int) -> bool:
    """HF's rule: not in ``mlp_only_layers``, and every ``decoder_sparse_step``-th layer."""
    step = getattr(config, "decoder_sparse_step", 1)
    if index in (getattr(config, "mlp_only_layers", None) or []) or config.num_experts == 0:
        return False
    return (index + 1) % step == 0


def qwen_moe_mlp(config, index: int, shared_expert: bool = False) -> nn.Module:
    hidden = config.hidden_size
    if not is_sparse_layer(config, index):
        return LlamaMLP(hidden, config.intermediate_size)
    shared = None
    if shared_expert:
        shared = LlamaMLP(hidden, config.shared_expert_intermediate_size)
    return SparseMoeBlock(
        hidden,
        config.moe_intermediate_size,
        config.num_experts,
        config.num_experts_per_tok,
        renormalize=bool(config.norm_topk_prob),
        shared_expert=shared,
    )


def _check(config) -> None:
    step = getattr(config, "decoder_sparse_step", 1)
    if not isinstance(step, int) or step < 1:
        raise ValueError(f"decoder_sparse_step={step!r} must be an integer >= 1")
    if config.num_experts:  # (0: every layer dense)
        check_moe_config(config.num_experts, config.num_experts_per_tok,
                         ("num_experts", "num_experts_per_tok"))  # fmt: skip


class Qwen3MoeForCausalLM(ExpertCheckpoint, LlamaForCausalLM):
    @staticmethod
    def layout(config) -> LlamaLayout:
        _check(config)
        bias = bool(getattr(config, "attention_bias", False))
        return LlamaLayout(qkv_bias=bias, o_bias=bias, qk_norm=True, mlp=qwen_moe_mlp)


class Qwen2MoeForCausalLM(ExpertCheckpoint, LlamaForCausalLM):
    @staticmethod
    def layout(config) -> LlamaLayout:
        _check(config)
        mlp = functools.partial(qwen_moe_mlp, shared_expert=True)
        return LlamaLayout(qkv_bias=bool(getattr(config, "qkv_bias", True)), mlp=mlp)
