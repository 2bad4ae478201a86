"""Qwen3 (dense): the Llama layout with an RMSNorm over each q and k head before rotary
(``q_norm`` / ``k_norm``), biases as ``attention_bias`` says (none in the released models),
an explicit ``head_dim``. (Qwen3-MoE is another architecture, not served here.)"""

from vllm_runner.model.llama import LlamaForCausalLM, LlamaLayout


class Qwen3ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def layout(config) -> LlamaLayout:
        bias = bool(getattr(config, "attention_bias", False))
        return LlamaLayout(qkv_bias=bias, o_bias=bias, qk_norm=True)
