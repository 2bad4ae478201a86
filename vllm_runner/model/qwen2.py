"""Qwen2: the Llama layout with biases on the q/k/v projections (not on o_proj)."""

from vllm_runner.model.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def projection_biases(config) -> tuple[bool, bool]:
        return True, False
