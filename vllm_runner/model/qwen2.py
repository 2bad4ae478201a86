"""Qwen2: the Llama layout with biases on the q/k/v projections (not on o_proj)."""

from vllm_runner.model.llama import LlamaForCausalLM, LlamaLayout


class Qwen2ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def layout(config) -> LlamaLayout:
        return LlamaLayout(qkv_bias=True)
