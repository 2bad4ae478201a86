"""Phi-3 / Phi-3.5 / Phi-4-mini: the Llama layout, its checkpoint holding q/k/v fused in
``qkv_proj`` and gate/up in ``gate_up_proj`` (our layers' own names: they load whole, each
layer keeping its rank's rows of every part); LongRoPE and a partial rotary are
layers/rotary.py's, the sliding window (every layer's) the attention's."""

from vllm_runner.model.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    packed_modules_mapping: dict = {}  # nothing split to fuse
