"""Piecewise CUDA graphs for steps that prefill: the forward between attentions captured per
token-count bucket, attention run eagerly between replays with the step's own metadata.

A step that admits a request (most steps of a busy server) cannot replay a decode graph, and
its eager forward launched ~10 kernels a layer from Python: a quarter of the served engine
loop on an H200. Here a layer is one graph replay plus its attention's launches (vLLM V1's
piecewise graphs, cut by hand instead of by a compiler). Pieces read and write static
buffers; attention reads the step's own tokens only (the qkv rows of its tokens), so pad
rows (input id 0) never reach the KV cache or another request. Without ``capture()`` (CPU,
``enforce_eager``) the same padded pieces run eagerly, so captured and eager steps launch
identical kernels on identical shapes.
"""

import bisect
import logging
import time

import torch

from vllm_runner.worker.device_inputs import DeviceInputs

logger = logging.getLogger(__name__)


def piecewise_buckets(max_tokens: int) -> list[int]:
    """Token counts of the graphs: every 64 up to 1024, every 128 up to 2048, every 256 on."""
    sizes = list(range(64, 1025, 64)) + list(range(1152, 2049, 128))
    sizes += list(range(2304, max_tokens, 256))
    return [s for s in sizes if s < max_tokens] + [max_tokens]


class PiecewiseGraphs:
    def __init__(self, model: torch.nn.Module, buffers: DeviceInputs, max_tokens: int) -> None:
        self.inner = model.model  # first_piece / next_piece / last_piece / attend
        self.buffers = buffers
        self.buckets = piecewise_buckets(max_tokens)
        self.num_layers = len(self.inner.layers)
        top = self.buckets[-1]
        first = self.inner.layers[0]
        attn = first.self_attn
        weight = first.input_layernorm.weight
        dtype, device = weight.dtype, weight.device
        hidden = weight.shape[0]
        qkv_size = attn.q_size + 2 * attn.kv_size

        def static(width: int) -> torch.Tensor:
            return torch.zeros(top, width, dtype=dtype, device=device)

        # pieces write these; the next piece (or the step's attention) reads them
        self.qkv, self.residual = static(qkv_size), static(hidden)
        self.attn_out, self.hidden = static(attn.q_size), static(hidden)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.capture_seconds = 0.0

    def bucket_for(self, num_tokens: int) -> int | None:
        i = bisect.bisect_left(self.buckets, num_tokens)
        return self.buckets[i] if i < len(self.buckets) else None

    # ---- the pieces: static buffers in, static buffers out ------------------------------------
    def _piece(self, size: int, j: int) -> None:
        if j == 0:
            qkv, residual = self.inner.first_piece(self.buffers.token_ids(size))
        elif j < self.num_layers:
            qkv, residual = self.inner.next_piece(j, self.attn_out[:size], self.residual[:size])
        else:
            self.hidden[:size].copy_(
                self.inner.last_piece(self.attn_out[:size], self.residual[:size])
            )
            return
        self.qkv[:size].copy_(qkv)
        self.residual[:size].copy_(residual)

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        pool = None
        for size in reversed(self.buckets):  # largest first: the others reuse its pool
            self.buffers.token_ids(size).zero_()
            for j in range(self.num_layers + 1):  # warm-up: compiles kernels outside captures
                self._piece(size, j)
            torch.cuda.synchronize()
            graphs = []
            for j in range(self.num_layers + 1):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._piece(size, j)
                pool = graph.pool()
                graphs.append(graph)
            self.graphs[size] = graphs
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - start
        logger.info(
            "captured %d piecewise CUDA graphs (%d token counts, %d..%d) in %.1f s",
            sum(len(g) for g in self.graphs.values()),
            len(self.buckets),
            self.buckets[0],
            self.buckets[-1],
            self.capture_seconds,
        )

    def run(self, size: int, num_tokens: int, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states [size, hidden] of a step whose input ids (``num_tokens`` of them,
        padded to ``size``) are staged (``DeviceInputs.load(pad_tokens=size)``); the caller
        holds the step's ``forward_context``."""
        graphs = self.graphs.get(size)
        for j in range(self.num_layers + 1):
            if j:  # layer j - 1's attention over the step's own tokens
                self.inner.attend(
                    j - 1, positions, self.qkv[:num_tokens], self.attn_out[:num_tokens]
                )
            if graphs is None:
                self._piece(size, j)
            else:
                graphs[j].replay()
        return self.hidden[:size]


def build_pieces(
    model: torch.nn.Module,
    buffers: DeviceInputs,
    max_tokens: int,
    capture: bool,
    device: torch.device,
) -> tuple[PiecewiseGraphs, int]:
    """The runner's pieces (captured if ``capture``) and the device bytes their graphs' pool
    reserved. Built before the KV cache, which pieces never read, so that what their capture
    holds (static buffers, the graphs' private pool) is known when the cache is sized."""
    cuda = device.type == "cuda"
    if cuda:
        # NOTE: first, or what is cached now (a dropped engine's KV cache) leaves in the
        # capture's own empty_cache and reads as a pool of minus that many bytes.
        torch.cuda.empty_cache()
        allocated = torch.cuda.memory_allocated(device)
        reserved = torch.cuda.memory_reserved(device)
    pieces = PiecewiseGraphs(model, buffers, max_tokens)
    if capture:
        pieces.capture()
    else:
        logger.warning(
            "piecewise_max_tokens=%d without CUDA graphs (%s): steps that prefill run the "
            "same padded pieces eagerly, which only adds work (kept for tests and A/Bs)",
            max_tokens,
            "enforce_eager" if cuda else "CPU",
        )
    pool_bytes = 0
    if cuda:  # the pool is reserved, not allocated: the profile's peak does not see it
        torch.cuda.empty_cache()  # (the warm-ups' activations)
        grown = torch.cuda.memory_reserved(device) - reserved
        held = torch.cuda.memory_allocated(device) - allocated
        pool_bytes = max(0, grown - held)
    return pieces, pool_bytes
