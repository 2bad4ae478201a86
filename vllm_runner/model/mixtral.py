"""Mixtral (8x7B, 8x22B): the Llama layout (Mistral's attention) with a mixture of experts
in every layer, top-k of ``num_local_experts`` renormalized; classic checkpoints name the
block ``block_sparse_moe`` and the experts' projections w1 (gate), w3 (up), w2 (down)."""

from vllm_runner.model.layers.moe import (
    ExpertCheckpoint,
    ExpertNames,
    SparseMoeBlock,
    check_moe_config,
)
from vllm_runner.model.llama import LlamaForCausalLM, LlamaLayout


def mixtral_moe(config, index: int) -> SparseMoeBlock:
    return SparseMoeBlock(
        config.hidden_size,
        config.intermediate_size,
        config.num_local_experts,
        config.num_experts_per_tok,
        renormalize=True,
    )


class MixtralForCausalLM(ExpertCheckpoint, LlamaForCausalLM):
    expert_names = ExpertNames(gate="w1", up="w3", down="w2", block="block_sparse_moe")

    @staticmethod
    def layout(config) -> LlamaLayout:
        check_moe_config(config.num_local_experts, config.num_experts_per_tok,
                         ("num_local_experts", "num_experts_per_tok"))  # fmt: skip
        return LlamaLayout(mlp=mixtral_moe)
