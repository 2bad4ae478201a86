"""CUDA graphs for pure-decode steps: one graph per batch-size bucket, captured at start-up,
replayed with the batch padded up to the next bucket."""

import bisect
import logging
import time

import torch
from torch import nn

from vllm_runner.model.layers.attention import AttentionMetadata, forward_context
from vllm_runner.worker.device_inputs import DeviceInputs

logger = logging.getLogger(__name__)


def decode_buckets(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4] + list(range(8, max_num_seqs + 8, 8))
    return sorted({min(s, max_num_seqs) for s in sizes})


def graph_output_bytes(max_num_seqs: int, vocab_rows: int, dtype: torch.dtype) -> int:
    """Device bytes the decode graphs' logits hold: one [largest bucket, vocab] output that
    every graph writes the first rows of (it was one output a graph: an 8B shape's 35 buckets
    held 4,231 rows of 128,256, 1.1 GB, against 256 rows now)."""
    return max(decode_buckets(max_num_seqs)) * vocab_rows * dtype.itemsize


class DecodeGraphs:
    """Graphs read their inputs from ``DeviceInputs``' views of their size and write logits into
    the first rows of one shared output, so a replay is: stage inputs, replay, read
    ``logits[:num_reqs]``. A step's logits are consumed by kernels queued before the next
    replay, which overwrites them (as a same-size step always did).

    Without ``capture()`` (``enforce_eager``) the same padded calls run eagerly, so graph and
    eager decoding launch identical kernels on identical shapes."""

    def __init__(
        self, model: nn.Module, buffers: DeviceInputs, max_num_seqs: int, max_model_len: int
    ) -> None:
        self.model = model
        self.buffers = buffers
        self.max_model_len = max_model_len
        self.buckets = decode_buckets(max_num_seqs)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self._logits_out: torch.Tensor | None = None  # [largest bucket, vocab rows]
        self.capture_seconds = 0.0

    def bucket_for(self, num_reqs: int) -> int | None:
        i = bisect.bisect_left(self.buckets, num_reqs)
        return self.buckets[i] if i < len(self.buckets) else None

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Compile what decode rows run outside the graphs: a mixed step's decode rows take
        the decode kernel without the in-kernel rotary (``fused_decode`` False), split
        (few rows with long contexts) or not (many rows, or contexts of one key tile), in row
        order (one row) or longest first; the split reduce for a grid of few splits (a short
        context) and of many. Left to the first mixed steps, those compiles stalled a W1 run
        on a fresh Triton cache by ~0.8 s (H200)."""
        for size in sorted({*self.buckets[:2], self.buckets[-1]}):
            self._blank_inputs(size)
            self._static_call(size, fused_decode=False)
            if size < self.buckets[-1] or len(self.buckets) == 1:  # one key tile: unsplit
                self._static_call(size, fused_decode=False, max_seq_len=1)
            if size == self.buckets[0] and self.max_model_len > 128:  # a few splits
                self._static_call(size, fused_decode=False, max_seq_len=128)

    def _blank_inputs(self, size: int) -> None:
        """Set the static inputs of a ``size``-row decode step so that warm-up and capture
        runs write and read nothing (other step sizes' layouts share these bytes)."""
        dev = self.buffers.views(size, size)
        dev["slot_mapping"].fill_(-1)
        dev["seq_lens"].zero_()
        dev["input_ids"].zero_()
        dev["positions"].zero_()
        dev["query_start_loc"].copy_(torch.arange(size + 1, dtype=torch.int32))
        dev["block_tables"].zero_()
        dev["decode_order"].copy_(torch.arange(size, dtype=torch.int32))

    def _static_call(
        self, size: int, fused_decode: bool = True, max_seq_len: int | None = None
    ) -> torch.Tensor:
        dev = self.buffers.views(size, size)
        md = AttentionMetadata(
            slot_mapping=dev["slot_mapping"],
            block_tables=dev["block_tables"],
            seq_lens=dev["seq_lens"],
            query_start_loc=dev["query_start_loc"],
            max_query_len=1,
            # NOTE: fixes the decode kernel's split count for the graph; any value is correct.
            max_seq_len=max_seq_len or self.max_model_len,
            fused_decode=fused_decode,  # graphs: True, replayed only for fused_decode steps
            decode_order=dev["decode_order"],
        )
        with forward_context(md):
            hidden = self.model(dev["input_ids"], dev["positions"])
            if hidden.is_cuda and self._logits_out is None:  # before any capture (warm-up)
                rows = self.model.lm_head.weight.shape[0]
                self._logits_out = hidden.new_empty(self.buckets[-1], rows)
            out = self._logits_out[:size] if hidden.is_cuda else None
            return self.model.compute_logits(hidden, out)

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        pool = None
        for size in reversed(self.buckets):  # largest first: later graphs reuse its pool
            self._blank_inputs(size)
            self._static_call(size)  # warm-up: compiles kernels outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[size] = self._static_call(size)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - start
        logger.info(
            "captured %d decode CUDA graphs (batch %d..%d) in %.1f s",
            len(self.graphs),
            self.buckets[0],
            self.buckets[-1],
            self.capture_seconds,
        )

    def run(self, size: int, num_reqs: int) -> torch.Tensor:
        graph = self.graphs.get(size)
        if graph is None:
            return self._static_call(size)[:num_reqs]
        graph.replay()
        return self.logits[size][:num_reqs]
