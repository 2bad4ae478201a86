"""OLMoE: the Llama layout with one RMSNorm over all of q and one over all of k (not per
head, as Qwen3's) before rotary, and a mixture of experts in every layer (top-k of
``num_experts``, renormalized when ``norm_topk_prob``). ``clip_qkv`` (clamping q, k and v)
is not implemented: refused naming its value."""

from vllm_runner.model.layers.moe import ExpertCheckpoint, SparseMoeBlock, check_moe_config
from vllm_runner.model.layers.parallel import tp_size
from vllm_runner.model.llama import LlamaForCausalLM, LlamaLayout


def olmoe_moe(config, index: int) -> SparseMoeBlock:
    return SparseMoeBlock(
        config.hidden_size,
        config.intermediate_size,
        config.num_experts,
        config.num_experts_per_tok,
        renormalize=bool(config.norm_topk_prob),
    )


class OlmoeForCausalLM(ExpertCheckpoint, LlamaForCausalLM):
    @staticmethod
    def layout(config) -> LlamaLayout:
        clip = getattr(config, "clip_qkv", None)
        if clip is not None:
            raise ValueError(f"clip_qkv={clip} is not supported by OlmoeForCausalLM (only None)")
        if tp_size() > 1:  # the norms over all heads would need them all on each rank
            raise ValueError(f"OlmoeForCausalLM runs at tensor-parallel size 1, not {tp_size()}")
        check_moe_config(config.num_experts, config.num_experts_per_tok,
                         ("num_experts", "num_experts_per_tok"))  # fmt: skip
        bias = bool(getattr(config, "attention_bias", False))
        return LlamaLayout(qkv_bias=bias, o_bias=bias, qk_norm_whole=True, mlp=olmoe_moe)
