"""Prepare inputs -> forward -> sample, for one scheduler output."""

import dataclasses
import logging
import time
import traceback

import numpy as np
import torch

from vllm_runner.config import CacheConfig, LoRAConfig, ModelConfig, SchedulerConfig
from vllm_runner.engine.outputs import ModelRunnerOutput, SchedulerOutput
from vllm_runner.lora.manager import LoRAManager
from vllm_runner.model.layers.attention import Attention, AttentionMetadata, forward_context
from vllm_runner.model.loader import build_model
from vllm_runner.sample.logprobs import PendingLogprobs
from vllm_runner.sample.rows import host_values
from vllm_runner.sample.sampler import Sampler
from vllm_runner.worker import memory, pooling
from vllm_runner.worker.cuda_graphs import DecodeGraphs, graph_output_bytes
from vllm_runner.worker.device_inputs import DeviceInputs
from vllm_runner.worker.input_batch import InputBatch, StepInputs
from vllm_runner.worker.offload import weight_bytes
from vllm_runner.worker.piecewise_graphs import build_pieces
from vllm_runner.worker.prompt_logprobs import prompt_logprobs

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class StepHandle:
    """A launched step: its sampled ids arrive in ``host`` once ``event`` completes."""

    result: ModelRunnerOutput
    sampling_ids: list[str]
    token_ids: list[int] | None = None
    logprobs: list | None = None
    overlapped: bool = False
    host: torch.Tensor | None = None
    event: torch.cuda.Event | None = None  # None on CPU, where the copy is synchronous
    pending_logprobs: PendingLogprobs | None = None  # overlapped steps' logprobs
    pooled: pooling.PooledVectors | None = None  # embedding requests' finished vectors


class ModelRunner:
    """Owns the model, the KV cache tensors and the sampler. Never changes a Request."""

    def __init__(
        self,
        model_config: ModelConfig,
        cache_config: CacheConfig,
        scheduler_config: SchedulerConfig,
        lora_config: LoRAConfig | None = None,
    ) -> None:
        self.config = model_config
        self.cache_config = cache_config
        self.scheduler_config = scheduler_config
        self.device = model_config.device
        torch.manual_seed(model_config.seed)
        self._baseline_bytes = memory.others_allocated_bytes(self.device)
        self.kv_dtype = memory.kv_cache_dtype(cache_config, model_config.dtype, self.device)
        start = time.perf_counter()
        self.model = build_model(
            model_config.path, model_config.hf_config, model_config.dtype, self.device,
            quantization=model_config.quantization, cpu_offload_gb=cache_config.cpu_offload_gb,
            gpu_memory_utilization=cache_config.gpu_memory_utilization,
            max_model_len=model_config.max_model_len,
        )  # fmt: skip
        self.weight_bytes = weight_bytes(self.model)  # stats(): resident / offloaded bytes
        self.load_seconds = time.perf_counter() - start
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        max_blocks = -(-model_config.max_model_len // cache_config.block_size)
        self.batch = InputBatch(cache_config.block_size, max_blocks)
        vocab = self.model.lm_head.vocab_size
        self.sampler = Sampler(self.device, model_config.seed, vocab, model_config.dtype)
        max_tokens = max(scheduler_config.max_num_batched_tokens, scheduler_config.max_num_seqs)
        self.lora = None  # (before the graphs and the KV cache: its slots are in both)
        if lora_config is not None:
            self.lora = LoRAManager(
                self.model, lora_config, max_tokens, model_config.dtype, self.device
            )
        lora_slots = self.lora.slots.tokens if self.lora is not None else None
        self.buffers = DeviceInputs(
            max_tokens, scheduler_config.max_num_seqs, max_blocks, self.device, lora_slots
        )
        # NOTE: offloaded layers stream weights from forward hooks: no graphs (logged there).
        offloading = getattr(self.model, "weight_offloader", None) is not None
        capture = self.device.type == "cuda" and not model_config.enforce_eager and not offloading
        self.pieces, self._pieces_pool_bytes = None, 0
        max_pieces = min(model_config.piecewise_max_tokens, scheduler_config.max_num_batched_tokens)
        if max_pieces >= 2 and not offloading and hasattr(self.model.model, "next_piece"):
            self.pieces, self._pieces_pool_bytes = build_pieces(
                self.model, self.buffers, max_pieces, capture, self.device
            )
        # decode graphs' logits (or their eager calls'), made after the KV cache: counted in it
        max_seqs, vocab_rows = scheduler_config.max_num_seqs, self.model.lm_head.weight.shape[0]
        self._graph_output_bytes = (
            graph_output_bytes(max_seqs, vocab_rows, model_config.dtype)
            if self.device.type == "cuda"
            else 0
        )
        self.num_blocks = self._allocate_kv_cache()
        # Last overlapped launch's sampled ids (device) and their rows by request id.
        self._prev: tuple[torch.Tensor | None, dict[str, int] | None] = (None, None)
        self._sampled_turn = 0
        pin = self.device.type == "cuda"
        self._sampled_host = [
            torch.zeros(max_seqs, dtype=torch.int64, pin_memory=pin) for _ in range(2)
        ]
        self.graphs = None
        if self.device.type == "cuda":
            self.graphs = DecodeGraphs(
                self.model, self.buffers, scheduler_config.max_num_seqs, model_config.max_model_len
            )
            self.graphs.warm_up()
            if capture:
                self.graphs.capture()

    # ---- KV cache --------------------------------------------------------------------------
    def _allocate_kv_cache(self) -> int:
        first = self.attn_layers[0]
        block_bytes = memory.kv_bytes_per_block(
            len(self.attn_layers),
            self.cache_config.block_size,
            first.num_kv_heads,
            first.head_dim,
            self.kv_dtype,
        )
        if self.cache_config.num_kv_blocks is not None:
            num_blocks = self.cache_config.num_kv_blocks
        elif self.device.type == "cuda":
            num_blocks = self._gpu_blocks(block_bytes)
        else:
            num_blocks = memory.num_blocks_for_cpu(self.cache_config.cpu_kv_cache_gb, block_bytes)
        shape = (num_blocks, self.cache_config.block_size, first.num_kv_heads, first.head_dim)
        for layer in self.attn_layers:
            layer.k_cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
            layer.v_cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        self.kv_cache_bytes = num_blocks * block_bytes
        logger.info(
            "KV cache: %d blocks of %d tokens (%.2f GiB, %s)",
            num_blocks,
            self.cache_config.block_size,
            self.kv_cache_bytes / memory.GiB,
            str(self.kv_dtype).removeprefix("torch."),
        )
        return num_blocks

    def _gpu_blocks(self, block_bytes: int) -> int:
        """KV blocks that fit next to the profiled peak of the largest step. Offloaded
        weights with too little room for every sequence at full length get a smaller step
        budget when that leaves more blocks (``memory.offload_step_budget``)."""
        sched = self.scheduler_config

        def blocks(num_tokens: int) -> int:
            peak = self._profile_peak_bytes(num_tokens) + self._pieces_pool_bytes
            peak += self._graph_output_bytes  # (allocated after the cache: not held)
            return memory.num_blocks_for_gpu(
                self.device,
                self.cache_config.gpu_memory_utilization,
                block_bytes,
                peak,
                self._held_bytes() + self._pieces_pool_bytes,
            )

        try:
            num_blocks, error = blocks(sched.max_num_batched_tokens), None
        except (ValueError, torch.OutOfMemoryError) as e:  # a smaller step may still fit
            # NOTE: the traceback's frames hold the failed forward's activations: drop them
            # before profiling again.
            traceback.clear_frames(e.__traceback__)
            num_blocks, error = 0, e
        offloading = getattr(self.model, "weight_offloader", None) is not None
        smaller = memory.offload_step_budget(
            sched.max_num_batched_tokens,
            sched.default_budget,
            offloading,
            num_blocks * self.cache_config.block_size,
            sched.max_num_seqs,
            sched.max_model_len,
        )
        if smaller is not None:
            try:
                more = blocks(smaller)
            except (ValueError, torch.OutOfMemoryError) as e:
                traceback.clear_frames(e.__traceback__)
                more = 0
            # Worth it only for a real gain: smaller steps also mean more copies per prompt.
            if more >= memory.OFFLOAD_MIN_GAIN * num_blocks and more > num_blocks:
                logger.info(
                    "offloaded weights: step budget %d tokens instead of %d leaves %d KV "
                    "blocks instead of %d (larger decode batches for the same weight copy)",
                    smaller, sched.max_num_batched_tokens, more, num_blocks,
                )  # fmt: skip
                self.scheduler_config = dataclasses.replace(sched, max_num_batched_tokens=smaller)
                return more
        if isinstance(error, torch.OutOfMemoryError):
            raise ValueError(
                f"the profiling step of max_num_batched_tokens={sched.max_num_batched_tokens} "
                f"tokens ran out of device memory ({str(error).splitlines()[0]}); lower "
                "max_num_batched_tokens, or use cpu_offload_gb / quantization"
            ) from error
        if error is not None:
            raise error
        return num_blocks

    def _held_bytes(self) -> int:
        """Device memory this engine has allocated now."""
        if self.device.type != "cuda":
            return 0
        return torch.cuda.memory_allocated(self.device) - self._baseline_bytes

    def _profile_peak_bytes(self, num_tokens: int) -> int:
        """Run a step of ``num_tokens`` tokens (the largest the scheduler may form) on a
        scratch cache and measure the peak. NOTE: the scratch cache counts in it; that
        margin also covers what the profile does not run (the sampler's per-row buffers,
        the decode graphs' intermediates; their outputs are counted apart)."""
        bs = self.cache_config.block_size
        first = self.attn_layers[0]
        scratch_blocks = -(-num_tokens // bs)
        shape = (scratch_blocks, bs, first.num_kv_heads, first.head_dim)
        try:
            for layer in self.attn_layers:
                layer.k_cache = torch.empty(shape, dtype=self.kv_dtype, device=self.device)
                layer.v_cache = layer.k_cache
            torch.cuda.reset_peak_memory_stats(self.device)
            ids = torch.randint(0, 100, (num_tokens,), device=self.device)
            positions = torch.arange(num_tokens, device=self.device) % self.config.max_model_len
            i32 = dict(dtype=torch.int32, device=self.device)
            md = AttentionMetadata(
                slot_mapping=torch.arange(num_tokens, device=self.device),
                block_tables=torch.arange(scratch_blocks, **i32)[None],
                seq_lens=torch.tensor([num_tokens], **i32),
                query_start_loc=torch.tensor([0, num_tokens], **i32),
                max_query_len=num_tokens,
                max_seq_len=num_tokens,
            )
            with torch.inference_mode(), forward_context(md):
                hidden = self.model(ids, positions)
                self.model.compute_logits(hidden[-self.scheduler_config.max_num_seqs :])
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - self._baseline_bytes
        finally:  # also after an out-of-memory error: a smaller step may be tried next
            for layer in self.attn_layers:
                layer.k_cache = layer.v_cache = torch.empty(0)
            torch.cuda.empty_cache()
        return peak

    def release(self, request_ids: set[str]) -> None:
        """Forget finished requests between steps (the engine went idle)."""
        self.batch.release(request_ids)

    # ---- one step --------------------------------------------------------------------------
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """One step, synchronously."""
        return self.wait(self.launch(sched, overlap=False))

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput, overlap: bool) -> StepHandle:
        """Queue a step's work on the device. With ``overlap``, the sampled ids are copied
        to the host asynchronously and ``wait`` reads them later; input tokens sampled by
        the previous launch are taken from the device, so the host never waits between."""
        self.batch.update(sched)
        handle = StepHandle(ModelRunnerOutput({}), [])
        if sched.is_empty:
            return handle
        inputs = self.batch.prepare(sched)
        if self.lora is not None:
            adapters = [self.batch.states[r].lora_request for r in inputs.request_ids]
            inputs.lora_slots = self.lora.step_slots(adapters, np.diff(inputs.query_start_loc))
        every_row = self._reads_every_token(inputs)  # prompt logprobs: no graph, no pruning
        # rows of embedding requests: no decode graph, no pruning (pieces keep every row)
        pooled = pooling.plan(self.batch.states, self.batch.pooling_ids, inputs)
        every_row_kept = every_row or pooled is not None
        graph_size = None if every_row_kept else self._graph_size(inputs)
        prev_sampled, prev_rows = self._prev
        if graph_size is not None:
            *_, logits_indices = self.buffers.load(inputs, graph_size, prev_sampled, prev_rows)
            num_reqs = len(inputs.request_ids)
            logits = self.graphs.run(graph_size, num_reqs)  # [num_reqs, vocab]
            if len(inputs.logits_indices) != num_reqs:  # else every row samples, in order
                logits = logits[logits_indices]
        else:
            piece_size = None if every_row else self._piece_size(inputs)
            input_ids, positions, md, logits_indices = self.buffers.load(
                inputs, 0, prev_sampled, prev_rows, pad_tokens=piece_size or 0
            )
            with forward_context(md):
                if piece_size is not None:  # [piece_size, hidden]: pad rows after the step's
                    hidden, keep = self.pieces.run(piece_size, len(positions), positions), None
                else:  # keep: only the sampled rows (maybe none) go past the last attention
                    keep = None if every_row_kept else logits_indices
                    if self.lora is not None and keep is not None:  # (the kept rows' slots)
                        self.lora.slots.kept = self.lora.slots.tokens[keep]
                    hidden = self.model(input_ids, positions, keep)
            if keep is None:  # every token's hidden state
                prompt_logprobs(self.model, self.batch.states, inputs, hidden, handle.result)
                if pooled is not None:
                    handle.pooled = pooling.pool(pooled, self.batch.states, hidden)
                hidden = hidden[logits_indices]
            logits = self.model.compute_logits(hidden) if inputs.sampling_ids else None
        handle.sampling_ids = inputs.sampling_ids
        if not inputs.sampling_ids:
            return handle
        states = self.batch.states
        needs_rows = self.batch.needs_rows
        rows = (
            [states[r] for r in inputs.sampling_ids]  # (each state is its sampling row)
            if needs_rows and not needs_rows.isdisjoint(inputs.sampling_ids)
            else None  # all plain greedy: the sampler takes the argmax, nothing per row
        )
        if not overlap:
            out = self.sampler(logits, rows)
            handle.token_ids, handle.logprobs = out.token_ids, out.logprobs
            return handle
        reads = rows is not None and any(r.params.reads_output for r in rows if r.has_extras)
        pending = self._pending_tokens(inputs.sampling_ids) if reads else None
        sampled, raw_logprobs = self.sampler.sample(logits, rows, pending)
        if raw_logprobs is not None:  # copied with the ids; ``wait`` makes the dicts
            handle.pending_logprobs = PendingLogprobs.copy(raw_logprobs, rows, sampled)
        for request_id in inputs.sampling_ids:
            states[request_id].num_pending += 1
        n = len(inputs.sampling_ids)
        self._sampled_turn ^= 1
        host = self._sampled_host[self._sampled_turn][:n]
        host.copy_(sampled, non_blocking=True)
        handle.overlapped, handle.host = True, host
        if self.device.type == "cuda":
            handle.event = torch.cuda.Event()
            handle.event.record()
        self._prev = (sampled, {r: i for i, r in enumerate(inputs.sampling_ids)})
        return handle

    def wait(self, handle: StepHandle) -> ModelRunnerOutput:
        """The step's results on the host; appends sampled tokens to the runner's state."""
        result = handle.result
        if handle.pooled is not None:
            result.pooled = handle.pooled.read()
        if handle.overlapped:
            if handle.event is not None:
                handle.event.synchronize()
            handle.token_ids = handle.host.tolist()
            if handle.pending_logprobs is not None:
                handle.logprobs = handle.pending_logprobs.entries(handle.token_ids)
        states = self.batch.states
        for i, request_id in enumerate(handle.sampling_ids):
            token = handle.token_ids[i]
            result.sampled[request_id] = token
            state = states.get(request_id)
            if state is not None:  # gone if finished or preempted since the launch
                state.token_ids.append(token)
                if handle.overlapped:
                    state.num_pending -= 1
            if handle.logprobs and handle.logprobs[i] is not None:
                result.logprobs[request_id] = handle.logprobs[i]
        # NOTE: ``_prev`` stays: a step that sampled nothing (a prefill chunk) is waited for
        # after the next launch, whose sampled ids the step after that still needs; ids
        # sampled synchronously are on the host, so nothing reads a stale ``_prev``.
        return result

    def _pending_tokens(self, sampling_ids: list[str]) -> torch.Tensor | None:
        """Per sampling row, its token sampled by the previous launch and not yet on the host
        (-1 if none): penalties count it without waiting for it."""
        prev_sampled, prev_rows = self._prev
        if prev_sampled is None or prev_rows is None:
            return None
        states = self.batch.states
        rows = [prev_rows.get(r, -1) if states[r].num_pending else -1 for r in sampling_ids]
        if all(i < 0 for i in rows):
            return None
        index = host_values(rows, torch.long, self.device)
        return torch.where(index >= 0, prev_sampled[index.clamp(min=0)], -1)

    def _graph_size(self, inputs: StepInputs) -> int | None:
        """The decode graph bucket this step can replay, if any."""
        if self.graphs is None or not inputs.fused_decode:
            return None
        return self.graphs.bucket_for(len(inputs.request_ids))

    def _piece_size(self, inputs: StepInputs) -> int | None:
        """The piecewise graph bucket of a step that prefills, if any."""
        if self.pieces is None or inputs.num_decode_rows == len(inputs.request_ids):
            return None  # (a decode step: one token a request)
        return self.pieces.bucket_for(len(inputs.input_ids))

    def _reads_every_token(self, inputs: StepInputs) -> bool:
        """A request of the step asks for prompt logprobs: every token's hidden state is
        read, so no graph (their outputs are the sampled rows or padded) serves it."""
        states = self.batch.states
        return any(states[r].params.prompt_logprobs is not None for r in inputs.request_ids)
