"""Llama family (Llama 2/3, SmolLM2, Mistral) with HF parameter names; the layout its
variants (qwen2.py, qwen3.py, phi3.py; the MoE models of mixtral.py, qwen_moe.py, olmoe.py)
change."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from vllm_runner.model.layers.attention import Attention, layer_sliding_window
from vllm_runner.model.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from vllm_runner.model.layers.linear import (
    QKV_GATE_UP_PACKED,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm_runner.model.layers.norm import RMSNorm
from vllm_runner.model.layers.rotary import RotaryEmbedding, rope_max_positions, rope_settings


def llama_head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def llama_rotary(config, max_model_len: int | None = None) -> RotaryEmbedding:
    """The model's one rotary table, which every layer shares (a [max_positions, head_dim]
    fp32 table a layer would be 512 MiB at Llama-3.2-1B's 16 layers and 128k positions).
    ``max_model_len``: the positions the engine serves (None: all the model's)."""
    theta, scaling = rope_settings(config)
    # the table may extend past max_position_embeddings (YaRN), which stays YaRN's original
    # context unless the config names one (Phi-3 names it at the top level)
    if not scaling.get("original_max_position_embeddings"):
        scaling["original_max_position_embeddings"] = (
            getattr(config, "original_max_position_embeddings", None)
            or config.max_position_embeddings
        )
    # Phi-4-mini rotates 3/4 of each head (transformers 5 moves the factor into the rope dict)
    partial = (
        scaling.get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", None) or 1
    )
    rotary_dim = int(llama_head_dim(config) * partial)
    return RotaryEmbedding(rotary_dim, rope_max_positions(config), theta, scaling, max_model_len)


@dataclass(frozen=True)
class LlamaLayout:
    """What a variant of the Llama layout changes."""

    qkv_bias: bool = False
    o_bias: bool = False
    # Qwen3: an RMSNorm over each q and each k head ([head_dim] weights), before rotary
    qk_norm: bool = False
    # OLMoE: instead one RMSNorm over all of q and one over all of k ([heads * head_dim])
    qk_norm_whole: bool = False
    # (config, layer index) -> that layer's MLP, e.g. a mixture of experts (None: LlamaMLP)
    mlp: Callable[[object, int], nn.Module] | None = None


class LlamaAttention(nn.Module):
    def __init__(
        self, config, layout: LlamaLayout, rotary_emb: RotaryEmbedding, layer: int = 0
    ) -> None:
        super().__init__()
        hidden = config.hidden_size
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        self.head_dim = head_dim = llama_head_dim(config)
        self.qkv_proj = QKVParallelLinear(
            hidden, head_dim, num_heads, num_kv_heads, layout.qkv_bias
        )
        self.o_proj = RowParallelLinear(num_heads * head_dim, hidden, layout.o_bias)
        self.q_size = self.qkv_proj.num_heads * head_dim
        self.kv_size = self.qkv_proj.num_kv_heads * head_dim
        self.qk_norm = layout.qk_norm or layout.qk_norm_whole
        self.qk_norm_whole = layout.qk_norm_whole
        if layout.qk_norm_whole:  # (world size 1: the norm of each rank's heads would differ)
            self.q_norm = RMSNorm(self.q_size, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.kv_size, config.rms_norm_eps)
        elif layout.qk_norm:
            self.q_norm = RMSNorm(head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(head_dim, config.rms_norm_eps)
        self.rotary_emb = rotary_emb  # the model's one table, shared by every layer
        self.attn = Attention(
            self.qkv_proj.num_heads,
            self.qkv_proj.num_kv_heads,
            head_dim,
            head_dim**-0.5,
            layer_sliding_window(config, layer),  # Mistral v0.1, Phi-3-mini-4k, Qwen2
        )

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [num_tokens, hidden] -> qkv [num_tokens, q_size + 2 * kv_size]."""
        return self.norm_heads(self.qkv_proj(hidden))

    def forward_one_row(self, positions, stream: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """``stream + o(attention(qkv(norm(stream))))`` for one token, the norm and the
        residual add inside the projections' GEMVs."""
        qkv = self.norm_heads(self.qkv_proj.forward_one_row(stream, norm=norm))
        return self.o_proj.forward_one_row(self.attend(positions, qkv), residual=stream)

    def norm_heads(self, qkv: torch.Tensor) -> torch.Tensor:
        """Qwen3's per-head q and k norms, in place in qkv; every path to ``attend`` (the
        layer's forward, the one-row GEMVs, the piecewise graphs' pieces) takes qkv from
        here, so that the norms precede the rotary wherever the attention applies it (in the
        CUDA kernels: with the cache write, or inside the fused decode attention)."""
        if not self.qk_norm:
            return qkv
        q, k, _ = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        for part, norm in ((q, self.q_norm), (k, self.k_norm)):
            if self.qk_norm_whole:
                part.copy_(norm(part))
                continue
            # [num_tokens, heads * head_dim] viewed as [num_tokens, heads, head_dim]
            part.copy_(norm(part.unflatten(-1, (-1, self.head_dim))).flatten(-2))
        return qkv

    def attend(
        self, positions: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return self.attn(q, k, v, self.rotary_emb, positions, out)


class LlamaMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [intermediate] * 2, bias)
        self.down_proj = RowParallelLinear(intermediate, hidden, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj.forward_silu_and_mul(x))

    def fuses_one_row(self, x: torch.Tensor) -> bool:
        return self.gate_up_proj.fuses_one_row(x) and self.down_proj.fuses_one_row(x)

    def forward_one_row(self, stream: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """``stream + down(silu_and_mul(gate_up(norm(stream))))`` for one token in two GEMVs."""
        act = self.gate_up_proj.forward_one_row(stream, norm=norm, gated=True)
        return self.down_proj.forward_one_row(act, residual=stream)


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self, config, layout: LlamaLayout, rotary_emb: RotaryEmbedding, index: int = 0
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layout, rotary_emb, index)
        if layout.mlp is not None:
            self.mlp = layout.mlp(config, index)
        else:
            self.mlp = LlamaMLP(
                config.hidden_size, config.intermediate_size, getattr(config, "mlp_bias", False)
            )
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, hidden, residual, rows=None):
        """(hidden, residual) -> (hidden, residual), the residual add deferred to the next
        norm; a lone token on a GPU instead passes the summed stream with residual None
        (``fuses_one_row``): four GEMVs and the attention, norms and adds inside the GEMVs.
        ``rows``: only those rows go on past the attention (which writes every row's K/V)."""
        if residual is None and self.fuses_one_row(hidden):
            stream = self.self_attn.forward_one_row(positions, hidden, self.input_layernorm)
            return self.mlp.forward_one_row(stream, self.post_attention_layernorm), None
        qkv, residual = self.before_attention(hidden, residual)
        attn_out = self.self_attn.attend(positions, qkv)
        if rows is not None:
            if not len(rows):  # nothing sampled: the K/V written is all the step needs
                return residual[:0], residual[:0]
            attn_out, residual = attn_out[rows], residual[rows]
        return self.after_attention(attn_out, residual)

    def before_attention(self, hidden, residual):
        """(hidden, residual) -> (qkv [num_tokens, q_size + 2 * kv_size], residual)."""
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        return self.self_attn.project(hidden), residual

    def after_attention(self, attn_out, residual):
        """(attention output, residual) -> (hidden, residual)."""
        hidden, residual = self.post_attention_layernorm(self.self_attn.o_proj(attn_out), residual)
        return self.mlp(hidden), residual

    def fuses_one_row(self, hidden: torch.Tensor) -> bool:
        attn = self.self_attn
        norms = (self.input_layernorm, self.post_attention_layernorm)
        return (
            all(n.weight.dtype == hidden.dtype for n in norms)
            and attn.qkv_proj.fuses_one_row(hidden)
            and attn.o_proj.fuses_one_row(hidden)
            and self.mlp.fuses_one_row(hidden)
        )


class LlamaModel(nn.Module):
    def __init__(self, config, layout: LlamaLayout, max_model_len: int | None = None) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        rotary_emb = llama_rotary(config, max_model_len)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, layout, rotary_emb, i)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, rows=None) -> torch.Tensor:
        """Final hidden states of every token, or of ``rows`` only (the last layer's o
        projection and MLP run for those rows alone; none for no rows)."""
        hidden, residual = self.embed_tokens(input_ids), None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            hidden, residual = layer(positions, hidden, residual, rows if i == last else None)
        if not len(hidden):
            return hidden
        if residual is None:  # the one-row path (LlamaDecoderLayer.forward)
            return self.norm(hidden)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    # ---- the forward in pieces cut at each attention (worker/piecewise_graphs.py) -------------
    def first_piece(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """input ids -> layer 0's (qkv, residual)."""
        return self.layers[0].before_attention(self.embed_tokens(input_ids), None)

    def next_piece(self, i: int, attn_out: torch.Tensor, residual: torch.Tensor):
        """Layer i - 1's attention output and residual -> layer i's (qkv, residual)."""
        hidden, residual = self.layers[i - 1].after_attention(attn_out, residual)
        return self.layers[i].before_attention(hidden, residual)

    def last_piece(self, attn_out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The last layer's attention output and residual -> the final hidden states."""
        hidden, residual = self.layers[-1].after_attention(attn_out, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def attend(self, i: int, positions: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor):
        """Layer i's attention into ``out`` (run eagerly between pieces: it reads the step's
        metadata)."""
        return self.layers[i].self_attn.attend(positions, qkv, out)


class LlamaForCausalLM(nn.Module):
    """Forward returns hidden states of every token; ``compute_logits`` maps the sampled
    positions to the vocabulary. ``max_model_len``: the positions the engine serves (None:
    all the model's), which picks LongRoPE's factors (layers/rotary.py)."""

    packed_modules_mapping = QKV_GATE_UP_PACKED
    implements_sliding_window = True  # config.py: max_model_len is not capped at the window

    def __init__(self, config, max_model_len: int | None = None) -> None:
        super().__init__()
        act = getattr(config, "hidden_act", "silu")
        if act not in ("silu", "swish"):  # the gated MLP's kernels fuse SiLU
            raise ValueError(
                f"hidden_act {act!r} is not supported by {type(self).__name__}: its gated MLP "
                "runs SiLU only (supported: 'silu')"
            )
        self.config = config
        self.model = LlamaModel(config, self.layout(config), max_model_len)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def layout(config) -> LlamaLayout:
        bias = bool(getattr(config, "attention_bias", False))
        return LlamaLayout(qkv_bias=bias, o_bias=bias)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, rows=None) -> torch.Tensor:
        return self.model(input_ids, positions, rows)

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden, out)
