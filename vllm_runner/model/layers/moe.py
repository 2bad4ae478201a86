"""Mixture-of-experts MLP: a router (linear -> softmax -> top-k -> optional renormalize) and
experts of gated SiLU MLPs whose weights are stacked, ``w13`` [experts, 2 * inter, hidden]
(gate rows, then up rows) and ``w2`` [experts, hidden, inter]; optionally a shared expert
gated by a sigmoid (Qwen2-MoE).

On CUDA the experts run the fused grouped GEMM (``kernels.fused_moe``: no host sync, so
CUDA graphs and piecewise graphs capture it); elsewhere ``kernels.reference.fused_moe``,
which groups the tokens by expert on the host. Tensor parallel: each rank holds its share
of every expert's inter features (gate / up rows, down columns) and the outputs are summed.

Checkpoints store experts either one tensor per expert and projection (the hub's classic
layout: ``experts.J.w1.weight`` / ``experts.J.gate_proj.weight`` ...) or stacked, as
transformers 5 keeps them in memory and writes them with ``save_original_format=False``
(``experts.gate_up_proj`` [experts, 2 * inter, hidden], ``experts.down_proj``); both load
(``expert_checkpoint_name``).
"""

import re
from dataclasses import dataclass

import torch
from torch import nn

from kernels import reference
from vllm_runner.model.layers.linear import ReplicatedLinear
from vllm_runner.model.layers.parallel import all_reduce, check_shape, divide, load_shard, tp_size


@dataclass(frozen=True)
class ExpertNames:
    """How the classic layout names an expert's projections, and the block holding them."""

    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    block: str = "mlp"  # Mixtral's classic checkpoints: "block_sparse_moe"


def expert_checkpoint_name(name: str, names: ExpertNames) -> tuple[str, object] | None:
    """A checkpoint tensor of an MoE block -> (our parameter name, shard id); None for the
    other tensors. Shard ids: ("gate" | "up" | "down", expert) for one expert's projection,
    None for a stacked tensor or the router."""
    renamed = name.replace(f".{names.block}.", ".mlp.") if names.block != "mlp" else name
    stacked = re.fullmatch(r"(.*\.mlp\.experts)\.(gate_up_proj|down_proj)", renamed)
    if stacked:
        return f"{stacked[1]}.{'w13' if stacked[2] == 'gate_up_proj' else 'w2'}", None
    projections = {names.gate: "gate", names.up: "up", names.down: "down"}
    pattern = rf"(.*\.mlp\.experts)\.(\d+)\.({'|'.join(map(re.escape, projections))})\.weight"
    one = re.fullmatch(pattern, renamed)
    if one:
        part = projections[one[3]]
        return f"{one[1]}.{'w2' if part == 'down' else 'w13'}", (part, int(one[2]))
    return (renamed, None) if renamed != name else None


class FusedMoE(nn.Module):
    """The experts' stacked weights; ``forward`` takes the router's choices."""

    def __init__(self, num_experts: int, hidden: int, inter: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.inter = divide(inter, tp_size(), "moe intermediate size")
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * self.inter, hidden),
                                requires_grad=False)  # fmt: skip
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, self.inter), requires_grad=False)
        for param in (self.w13, self.w2):
            param.weight_loader = self.weight_loader

    def checkpoint_shards(self, param_name: str) -> list[tuple[str, int]]:
        """The per-expert shard ids that make up ``param_name`` (the loader's completeness
        check: a parameter loads whole, or from all of these)."""
        parts = ("down",) if param_name == "w2" else ("gate", "up")
        return [(part, e) for e in range(self.num_experts) for part in parts]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        """``shard_id`` None: the stacked tensor of every expert; else (part, expert)."""
        inter = self.inter
        if param is self.w2:  # [experts, hidden, inter]: this rank's inter columns
            dst = param.data if shard_id is None else param.data[shard_id[1]]
            load_shard(dst, loaded, dst.dim() - 1)
            return
        if shard_id is None:  # [experts, 2 * inter, hidden]: gate rows of every rank, then up
            check_shape(loaded, [self.num_experts, 2 * inter * tp_size(), param.shape[2]])
            for offset, part in zip((0, inter), loaded.chunk(2, dim=1), strict=True):
                load_shard(param.data.narrow(1, offset, inter), part, 1)
            return
        part, expert = shard_id
        offset = 0 if part == "gate" else inter
        load_shard(param.data[expert].narrow(0, offset, inter), loaded, 0)

    def forward(
        self,
        x: torch.Tensor,  # [num_tokens, hidden]
        topk_weights: torch.Tensor,  # [num_tokens, top_k] fp32
        topk_ids: torch.Tensor,  # [num_tokens, top_k]
    ) -> torch.Tensor:  # [num_tokens, hidden], this rank's partial sum
        if x.is_cuda:
            from kernels.fused_moe import fused_moe

            return fused_moe(x, self.w13, self.w2, topk_weights, topk_ids)
        return reference.fused_moe(x, self.w13, self.w2, topk_weights, topk_ids)


class SparseMoeBlock(nn.Module):
    """Router + experts (+ a shared expert whose output a sigmoid gate scales), HF names:
    ``gate`` (the router), ``experts``, ``shared_expert``, ``shared_expert_gate``."""

    def __init__(
        self,
        hidden: int,
        inter: int,
        num_experts: int,
        top_k: int,
        renormalize: bool,
        shared_expert: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize
        self.gate = ReplicatedLinear(hidden, num_experts, bias=False)
        self.experts = FusedMoE(num_experts, hidden, inter)
        self.shared_expert = shared_expert
        if shared_expert is not None:
            self.shared_expert_gate = ReplicatedLinear(hidden, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [num_tokens, hidden]
        topk_weights, topk_ids = reference.moe_route(self.gate(x), self.top_k, self.renormalize)
        out = all_reduce(self.experts(x, topk_weights, topk_ids))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out

    def fuses_one_row(self, x: torch.Tensor) -> bool:
        return False  # (the one-row GEMVs are the dense MLP's)


class ExpertCheckpoint:
    """Mixin of the MoE model classes: the loader maps checkpoint names through
    ``remap_checkpoint_name`` (expert tensors of either layout) before anything else, and
    the engine refuses the options that do not cover the experts (``has_experts``)."""

    has_experts = True
    expert_names = ExpertNames()

    def remap_checkpoint_name(self, name: str) -> tuple[str, object] | None:
        return expert_checkpoint_name(name, self.expert_names)


def check_moe_config(num_experts: int, top_k: int, fields: tuple[str, str]) -> None:
    """A ValueError naming the config field when the routing cannot work."""
    if num_experts < 1:
        raise ValueError(f"{fields[0]}={num_experts} must be >= 1")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"{fields[1]}={top_k} must be in [1, {fields[0]}={num_experts}]")
