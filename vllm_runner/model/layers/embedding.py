"""Vocab-parallel embedding and LM head."""

import torch
import torch.nn.functional as F
from torch import nn

from vllm_runner.model.layers import cpu_gemm
from vllm_runner.model.layers.linear import gemv_takes
from vllm_runner.model.layers.parallel import (
    all_gather_last_dim,
    all_reduce,
    check_shape,
    tp_rank,
    tp_size,
)


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a contiguous slice of the vocabulary."""

    def __init__(self, vocab_size: int, hidden: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        # Pad so every rank gets the same slice size.
        self.shard = -(-vocab_size // tp_size())
        self.start = tp_rank() * self.shard
        self.weight = nn.Parameter(torch.empty(self.shard, hidden), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        check_shape(loaded, (self.vocab_size, param.shape[1]))  # the whole, unpadded vocab
        rows = max(0, min(self.shard, self.vocab_size - self.start))
        param.data[:rows].copy_(loaded[self.start : self.start + rows])
        param.data[rows:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if tp_size() == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        mask = (local < 0) | (local >= self.shard)
        out = F.embedding(local.masked_fill(mask, 0), self.weight)
        return all_reduce(out.masked_fill(mask[:, None], 0))


class ParallelLMHead(VocabParallelEmbedding):
    """Logits over the vocabulary (weights may be tied to the embedding)."""

    def __init__(self, vocab_size: int, hidden: int) -> None:
        super().__init__(vocab_size, hidden)
        self.cpu_packed: torch.Tensor | None = None  # oneDNN copy of weight (layers/cpu_gemm.py)

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``out`` (optional, [num_tokens, weight rows], one rank, GPU): the logits are
        written there (the decode graphs' one shared output) instead of a new tensor."""
        if self.cpu_packed is not None:
            logits = cpu_gemm.linear(hidden, self.cpu_packed, None)
        elif gemv_takes(hidden, self.weight):  # batch-1 decode: 1.07-1.2x cuBLAS on an H200
            from kernels.gemv import linear_one_row

            logits = linear_one_row(hidden, self.weight, out=out)
        elif out is not None and tp_size() == 1:
            logits = torch.mm(hidden, self.weight.t(), out=out)
        else:
            logits = F.linear(hidden, self.weight)  # [num_tokens, vocab_shard]
        return all_gather_last_dim(logits)[:, : self.vocab_size]
