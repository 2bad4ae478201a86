"""OPT (the seed example's family): learned positions, LayerNorm, ReLU MLP, biases."""

import torch
import torch.nn.functional as F
from torch import nn

from vllm_runner.model.layers.attention import Attention
from vllm_runner.model.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from vllm_runner.model.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)

_ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}
# NOTE: OPT's learned position table is offset by 2 (a fairseq convention).
_POSITION_OFFSET = 2


class OPTAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, bias: bool) -> None:
        super().__init__()
        head_dim = hidden // heads
        self.qkv_proj = QKVParallelLinear(hidden, head_dim, heads, heads, bias)
        self.out_proj = RowParallelLinear(hidden, hidden, bias)
        self.attn = Attention(
            self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, head_dim, head_dim**-0.5
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).chunk(3, dim=-1)
        return self.out_proj(self.attn(q, k, v))


class OPTDecoderLayer(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        hidden = config.hidden_size
        bias = getattr(config, "enable_bias", True)
        self.self_attn = OPTAttention(hidden, config.num_attention_heads, bias)
        self.fc1 = ColumnParallelLinear(hidden, config.ffn_dim, bias)
        self.fc2 = RowParallelLinear(config.ffn_dim, hidden, bias)
        affine = getattr(config, "layer_norm_elementwise_affine", True)
        self.self_attn_layer_norm = nn.LayerNorm(hidden, elementwise_affine=affine)
        self.final_layer_norm = nn.LayerNorm(hidden, elementwise_affine=affine)
        self.pre_norm = config.do_layer_norm_before
        act = config.activation_function
        if act not in _ACTIVATIONS:
            raise ValueError(
                f"OPT activation_function {act!r} is not supported (supported: "
                f"{', '.join(sorted(_ACTIVATIONS))})"
            )
        self.act = _ACTIVATIONS[act]

    def forward(self, hidden: torch.Tensor, rows=None) -> torch.Tensor:
        """``rows``: only those rows go on past the attention (which writes every row's K/V)."""
        residual = hidden
        if self.pre_norm:
            hidden = self.self_attn_layer_norm(hidden)
        hidden = residual + self.self_attn(hidden)
        if not self.pre_norm:
            hidden = self.self_attn_layer_norm(hidden)
        if rows is not None:
            hidden = hidden[rows]
            if not len(hidden):  # nothing sampled: the K/V written is all the step needs
                return hidden
        residual = hidden
        if self.pre_norm:
            hidden = self.final_layer_norm(hidden)
        hidden = residual + self.fc2(self.act(self.fc1(hidden)))
        if not self.pre_norm:
            hidden = self.final_layer_norm(hidden)
        return hidden


class OPTDecoder(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        proj_dim = getattr(config, "word_embed_proj_dim", None) or config.hidden_size
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, proj_dim)
        self.embed_positions = nn.Embedding(
            config.max_position_embeddings + _POSITION_OFFSET, config.hidden_size
        )
        self.project_in = self.project_out = None
        if proj_dim != config.hidden_size:
            self.project_in = ReplicatedLinear(proj_dim, config.hidden_size, bias=False)
            self.project_out = ReplicatedLinear(config.hidden_size, proj_dim, bias=False)
        self.final_layer_norm = None
        if config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False):
            affine = getattr(config, "layer_norm_elementwise_affine", True)
            self.final_layer_norm = nn.LayerNorm(config.hidden_size, elementwise_affine=affine)
        self.layers = nn.ModuleList(
            OPTDecoderLayer(config) for _ in range(config.num_hidden_layers)
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, rows=None) -> torch.Tensor:
        """Final hidden states of every token, or of ``rows`` only (as LlamaModel)."""
        hidden = self.embed_tokens(input_ids)
        if self.project_in is not None:
            hidden = self.project_in(hidden)
        hidden = hidden + self.embed_positions(positions + _POSITION_OFFSET)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            hidden = layer(hidden, rows if i == last else None)
        if not len(hidden):
            return hidden
        if self.final_layer_norm is not None:
            hidden = self.final_layer_norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        return hidden


class OPTModel(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.decoder = OPTDecoder(config)


class OPTForCausalLM(nn.Module):
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
    }

    def __init__(self, config, max_model_len: int | None = None) -> None:
        # (max_model_len: the loader passes it to every model; learned positions need none)
        super().__init__()
        self.config = config
        self.model = OPTModel(config)
        proj_dim = getattr(config, "word_embed_proj_dim", None) or config.hidden_size
        self.lm_head = ParallelLMHead(config.vocab_size, proj_dim)
        if getattr(config, "tie_word_embeddings", True):
            self.lm_head.weight = self.model.decoder.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, rows=None) -> torch.Tensor:
        return self.model.decoder(input_ids, positions, rows)

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden, out)
