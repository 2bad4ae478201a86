"""HF architecture name -> our model class."""

from torch import nn

from vllm_runner.model.llama import LlamaForCausalLM
from vllm_runner.model.opt import OPTForCausalLM
from vllm_runner.model.qwen2 import Qwen2ForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "OPTForCausalLM": OPTForCausalLM,
}


def resolve_model_class(hf_config: object) -> type[nn.Module]:
    architectures = getattr(hf_config, "architectures", None) or []
    for arch in architectures:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ValueError(
        f"unsupported model architecture {architectures or hf_config.model_type!r}; "
        f"supported: {sorted(MODEL_REGISTRY)}"
    )
