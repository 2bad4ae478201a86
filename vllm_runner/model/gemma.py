"""Gemma 2 and Gemma 3 (text only) with HF parameter names.

Both: embeddings scaled by sqrt(hidden_size) (rounded to the model's dtype, as HF does),
RMSNorms that scale by (1 + weight) in fp32, a norm before and after both the attention and
the MLP, a GeGLU MLP (tanh-approximated GELU), attention scaled by query_pre_attn_scalar^-0.5,
sliding-window layers (``layer_types``) and tied embeddings. Gemma 2 soft-caps the attention
scores and the final logits; Gemma 3 norms each q and k head before the rotary and rotates its
sliding layers by their own (local) base frequency, its full layers by rope_theta with the
config's rope scaling. (Gemma 3's multimodal Gemma3ForConditionalGeneration is refused by the
registry.)
"""

import torch
import torch.nn.functional as F
from torch import nn

from vllm_runner.model.layers.attention import Attention, layer_sliding_window
from vllm_runner.model.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from vllm_runner.model.layers.linear import (
    QKV_GATE_UP_PACKED,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm_runner.model.layers.rotary import RotaryEmbedding

# transformers' names of the MLP activations Gemma checkpoints use
_ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


class GemmaRMSNorm(nn.Module):
    """RMSNorm scaling by (1 + weight), the product taken in fp32 and then rounded (HF's
    Gemma order; Llama's rounds before the product)."""

    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(hidden), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)


def gemma_rotaries(config) -> dict[str, RotaryEmbedding]:
    """One rotary table per layer type the model has ("sliding_attention",
    "full_attention"): Gemma 3's rope_parameters name one per type (the local base frequency
    for sliding layers, rope_theta and the rope scaling for full ones); Gemma 2's one
    setting serves both."""
    params = getattr(config, "rope_parameters", None) or {}
    max_positions = config.max_position_embeddings
    tables = {}
    for kind in sorted(set(config.layer_types)):
        setting = dict(params.get(kind, params))  # per type (Gemma 3) or one for all
        theta = setting.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0
        tables[kind] = RotaryEmbedding(config.head_dim, max_positions, float(theta), setting)
    return tables


class GemmaAttention(nn.Module):
    def __init__(self, config, layer: int, rotary: RotaryEmbedding, qk_norm: bool) -> None:
        super().__init__()
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = head_dim = config.head_dim
        bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, heads, kv_heads, bias)
        self.o_proj = RowParallelLinear(heads * head_dim, config.hidden_size, bias)
        self.q_size = self.qkv_proj.num_heads * head_dim
        self.kv_size = self.qkv_proj.num_kv_heads * head_dim
        self.qk_norm = qk_norm
        if qk_norm:  # Gemma 3
            self.q_norm = GemmaRMSNorm(head_dim, config.rms_norm_eps)
            self.k_norm = GemmaRMSNorm(head_dim, config.rms_norm_eps)
        self.rotary_emb = rotary  # the model's table for this layer's type
        self.attn = Attention(
            self.qkv_proj.num_heads,
            self.qkv_proj.num_kv_heads,
            head_dim,
            config.query_pre_attn_scalar**-0.5,
            layer_sliding_window(config, layer),
            float(getattr(config, "attn_logit_softcapping", None) or 0.0),
        )

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm:  # per head, before the rotary
            q = self.q_norm(q.unflatten(-1, (-1, self.head_dim))).flatten(-2)
            k = self.k_norm(k.unflatten(-1, (-1, self.head_dim))).flatten(-2)
        return self.o_proj(self.attn(q, k, v, self.rotary_emb, positions))


class GemmaMLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        hidden, inter = config.hidden_size, config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [inter] * 2)
        self.down_proj = RowParallelLinear(inter, hidden)
        self.act = _ACTIVATIONS[config.hidden_activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # this rank's [gate | up] shards
        return self.down_proj(self.act(gate) * up)


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config, layer: int, rotary: RotaryEmbedding, qk_norm: bool) -> None:
        super().__init__()
        self.self_attn = GemmaAttention(config, layer, rotary, qk_norm)
        self.mlp = GemmaMLP(config)
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps)

    def forward(self, positions, hidden: torch.Tensor, rows=None) -> torch.Tensor:
        """``rows``: only those rows go on past the attention (which writes every row's K/V)."""
        attn = self.self_attn(positions, self.input_layernorm(hidden))
        if rows is not None:
            if not len(rows):  # nothing sampled: the K/V written is all the step needs
                return hidden[:0]
            attn, hidden = attn[rows], hidden[rows]
        hidden = hidden + self.post_attention_layernorm(attn)
        mlp = self.mlp(self.pre_feedforward_layernorm(hidden))
        return hidden + self.post_feedforward_layernorm(mlp)


class GemmaModel(nn.Module):
    def __init__(self, config, qk_norm: bool) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.rotary = gemma_rotaries(config)
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(config, i, self.rotary[kind], qk_norm)
            for i, kind in enumerate(config.layer_types)
        )
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hidden_size = config.hidden_size

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, rows=None) -> torch.Tensor:
        """Final hidden states of every token, or of ``rows`` only."""
        hidden = self.embed_tokens(input_ids)
        # HF multiplies by sqrt(hidden_size) rounded to the model's dtype
        normalizer = torch.tensor(self.hidden_size**0.5, dtype=hidden.dtype).item()
        hidden = hidden * normalizer
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            hidden = layer(positions, hidden, rows if i == last else None)
        return self.norm(hidden)


class Gemma2ForCausalLM(nn.Module):
    """Gemma 2: forward returns hidden states; ``compute_logits`` maps them to soft-capped
    logits (final_logit_softcapping), which sampling and logprobs both read."""

    packed_modules_mapping = QKV_GATE_UP_PACKED
    qk_norm = False
    implements_sliding_window = True  # config.py: max_model_len is not capped at the window

    def __init__(self, config, max_model_len: int | None = None) -> None:
        super().__init__()
        check_gemma_config(config)
        self.config = config
        self.model = GemmaModel(config, self.qk_norm)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if getattr(config, "tie_word_embeddings", True):
            self.lm_head.weight = self.model.embed_tokens.weight
        self.final_softcap = float(getattr(config, "final_logit_softcapping", None) or 0.0)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, rows=None) -> torch.Tensor:
        return self.model(input_ids, positions, rows)

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.lm_head.compute_logits(hidden, out)
        if self.final_softcap:  # in place: ``out`` (the decode graphs' buffer) holds them
            logits.div_(self.final_softcap).tanh_().mul_(self.final_softcap)
        return logits


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    """Gemma 3, text only (model_type gemma3_text, e.g. gemma-3-1b-it / 270m): Gemma 2's
    layout with q / k norms, per-type rotary tables and (in the released models) no caps."""

    qk_norm = True


def check_gemma_config(config) -> None:
    """Refuse, naming the field, what the Gemma layers here do not compute."""
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if act not in _ACTIVATIONS:
        raise ValueError(
            f"hidden_activation {act!r} is not supported by Gemma here "
            f"(supported: {', '.join(sorted(_ACTIVATIONS))})"
        )
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError(
            "use_bidirectional_attention=True (an embedding Gemma, e.g. EmbeddingGemma) is not "
            "supported: the engine serves causal attention only"
        )
    kinds = set(getattr(config, "layer_types", None) or ())
    if not kinds <= {"sliding_attention", "full_attention"}:
        raise ValueError(
            f"layer_types {sorted(kinds)} are not supported (supported: sliding_attention, "
            "full_attention)"
        )
