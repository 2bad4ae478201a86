"""HF architecture name -> our model class."""

from torch import nn

from vllm_runner.model.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM
from vllm_runner.model.llama import LlamaForCausalLM
from vllm_runner.model.mixtral import MixtralForCausalLM
from vllm_runner.model.olmoe import OlmoeForCausalLM
from vllm_runner.model.opt import OPTForCausalLM
from vllm_runner.model.phi3 import Phi3ForCausalLM
from vllm_runner.model.qwen2 import Qwen2ForCausalLM
from vllm_runner.model.qwen3 import Qwen3ForCausalLM
from vllm_runner.model.qwen_moe import Qwen2MoeForCausalLM, Qwen3MoeForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    # Llama-1 conversions made before transformers named the class (decapoda-research/
    # llama-7b-hf and its fine-tunes); transformers loads them by model_type "llama"
    "LLaMAForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    # mixtures of experts (layers/moe.py)
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "OlmoeForCausalLM": OlmoeForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "OPTForCausalLM": OPTForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,  # text only (model_type gemma3_text)
    # the bare decoders (transformers' AutoModel) of embedding checkpoints, e.g.
    # e5-mistral-7b-instruct's MistralModel: weights without the "model." prefix nor LM head
    "LlamaModel": LlamaForCausalLM,
    "MistralModel": LlamaForCausalLM,
    "Qwen2Model": Qwen2ForCausalLM,
    "Qwen3Model": Qwen3ForCausalLM,
}


# a config without "architectures" (as transformers' Auto classes read it): by model_type
BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "phi3": "Phi3ForCausalLM", "opt": "OPTForCausalLM",
                 "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM",
                 "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}  # fmt: skip

# architectures known and refused, with the reason
REFUSED = {
    "Gemma3ForConditionalGeneration": (
        "Gemma 3's multimodal model (images and text) is not supported; its text-only "
        "Gemma3ForCausalLM (model_type gemma3_text, e.g. gemma-3-1b-it) is"
    ),
}


def resolve_model_class(hf_config: object) -> type[nn.Module]:
    architectures = getattr(hf_config, "architectures", None) or []
    model_type = getattr(hf_config, "model_type", None)
    for arch in architectures or [BY_MODEL_TYPE.get(model_type)]:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    for arch in architectures:
        if arch in REFUSED:
            raise ValueError(f"unsupported model architecture {arch!r}: {REFUSED[arch]}")
    if architectures:
        named = f"architecture {architectures}"
    else:
        named = f"type {model_type!r} (config.json names no architectures)"
    raise ValueError(
        f"unsupported model {named}; supported architectures: {sorted(MODEL_REGISTRY)}, "
        f"model types: {sorted(BY_MODEL_TYPE)}"
    )
