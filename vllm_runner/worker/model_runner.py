"""Prepare inputs -> forward -> sample, for one scheduler output."""

import logging
import time

import torch

from vllm_runner.config import CacheConfig, ModelConfig, SchedulerConfig
from vllm_runner.engine.outputs import ModelRunnerOutput, SchedulerOutput
from vllm_runner.model.layers.attention import Attention, AttentionMetadata, forward_context
from vllm_runner.model.loader import build_model
from vllm_runner.sample.sampler import Sampler, SamplingRow
from vllm_runner.worker import memory
from vllm_runner.worker.cuda_graphs import DecodeGraphs
from vllm_runner.worker.device_inputs import DeviceInputs
from vllm_runner.worker.input_batch import InputBatch, StepInputs

logger = logging.getLogger(__name__)


class ModelRunner:
    """Owns the model, the KV cache tensors and the sampler. Never changes a Request."""

    def __init__(
        self,
        model_config: ModelConfig,
        cache_config: CacheConfig,
        scheduler_config: SchedulerConfig,
    ) -> None:
        self.config = model_config
        self.cache_config = cache_config
        self.scheduler_config = scheduler_config
        self.device = model_config.device
        torch.manual_seed(model_config.seed)
        start = time.perf_counter()
        self.model = build_model(
            model_config.path, model_config.hf_config, model_config.dtype, self.device
        )
        self.load_seconds = time.perf_counter() - start
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.batch = InputBatch(cache_config.block_size)
        self.sampler = Sampler(self.device, model_config.seed)
        max_blocks = -(-model_config.max_model_len // cache_config.block_size)
        self.buffers = DeviceInputs(
            max(scheduler_config.max_num_batched_tokens, scheduler_config.max_num_seqs),
            scheduler_config.max_num_seqs,
            max_blocks,
            self.device,
        )
        self.num_blocks = self._allocate_kv_cache()
        self.graphs = None
        if self.device.type == "cuda" and not model_config.enforce_eager:
            self.graphs = DecodeGraphs(
                self.model, self.buffers, scheduler_config.max_num_seqs, model_config.max_model_len
            )
            self.graphs.capture()

    # ---- KV cache --------------------------------------------------------------------------
    def _allocate_kv_cache(self) -> int:
        first = self.attn_layers[0]
        block_bytes = memory.kv_bytes_per_block(
            len(self.attn_layers),
            self.cache_config.block_size,
            first.num_kv_heads,
            first.head_dim,
            self.config.dtype,
        )
        if self.cache_config.num_kv_blocks is not None:
            num_blocks = self.cache_config.num_kv_blocks
        elif self.device.type == "cuda":
            num_blocks = memory.num_blocks_for_gpu(
                self.device,
                self.cache_config.gpu_memory_utilization,
                block_bytes,
                self._profile_peak_bytes(),
            )
        else:
            num_blocks = memory.num_blocks_for_cpu(self.cache_config.cpu_kv_cache_gb, block_bytes)
        shape = (num_blocks, self.cache_config.block_size, first.num_kv_heads, first.head_dim)
        for layer in self.attn_layers:
            layer.k_cache = torch.zeros(shape, dtype=self.config.dtype, device=self.device)
            layer.v_cache = torch.zeros(shape, dtype=self.config.dtype, device=self.device)
        self.kv_cache_bytes = num_blocks * block_bytes
        logger.info(
            "KV cache: %d blocks of %d tokens (%.2f GiB)",
            num_blocks,
            self.cache_config.block_size,
            self.kv_cache_bytes / memory.GiB,
        )
        return num_blocks

    def _profile_peak_bytes(self) -> int:
        """Run the largest step the scheduler can form, on a scratch cache, and measure."""
        num_tokens = self.scheduler_config.max_num_batched_tokens
        bs = self.cache_config.block_size
        first = self.attn_layers[0]
        scratch_blocks = -(-num_tokens // bs)
        shape = (scratch_blocks, bs, first.num_kv_heads, first.head_dim)
        for layer in self.attn_layers:
            layer.k_cache = torch.empty(shape, dtype=self.config.dtype, device=self.device)
            layer.v_cache = layer.k_cache
        torch.cuda.reset_peak_memory_stats(self.device)
        ids = torch.randint(0, 100, (num_tokens,), device=self.device)
        positions = torch.arange(num_tokens, device=self.device) % self.config.max_model_len
        md = AttentionMetadata(
            slot_mapping=torch.arange(num_tokens, device=self.device),
            block_tables=torch.arange(scratch_blocks, dtype=torch.int32, device=self.device)[None],
            seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=self.device),
            query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=self.device),
            max_query_len=num_tokens,
            max_seq_len=num_tokens,
        )
        with torch.inference_mode(), forward_context(md):
            hidden = self.model(ids, positions)
            self.model.compute_logits(hidden[-self.scheduler_config.max_num_seqs :])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        for layer in self.attn_layers:
            layer.k_cache = layer.v_cache = torch.empty(0)
        torch.cuda.empty_cache()
        return peak

    # ---- one step --------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self.batch.update(sched)
        if sched.is_empty:
            return ModelRunnerOutput({})
        inputs = self.batch.prepare(sched)
        result = ModelRunnerOutput({})
        graph_size = self._graph_size(inputs)
        if graph_size is not None:
            *_, logits_indices = self.buffers.load(inputs, pad_reqs=graph_size)
            logits = self.graphs.replay(graph_size, len(inputs.request_ids))[logits_indices]
        else:
            input_ids, positions, md, logits_indices = self.buffers.load(inputs)
            with forward_context(md):
                hidden = self.model(input_ids, positions)  # [num_tokens, hidden]
            self._prompt_logprobs(inputs, hidden, result)
            logits = self.model.compute_logits(hidden[logits_indices])
        if inputs.sampling_ids:
            rows = [self._sampling_row(r) for r in inputs.sampling_ids]
            out = self.sampler(logits, rows)
            for request_id, token, lp in zip(
                inputs.sampling_ids, out.token_ids, out.logprobs, strict=True
            ):
                result.sampled[request_id] = token
                self.batch.states[request_id].token_ids.append(token)
                if lp is not None:
                    result.logprobs[request_id] = lp
        return result

    def _graph_size(self, inputs: StepInputs) -> int | None:
        """The decode graph bucket this step can replay, if any."""
        if self.graphs is None or inputs.max_query_len != 1:
            return None
        states = self.batch.states
        if any(states[r].params.prompt_logprobs is not None for r in inputs.request_ids):
            return None
        return self.graphs.bucket_for(len(inputs.request_ids))

    def _sampling_row(self, request_id: str) -> SamplingRow:
        s = self.batch.states[request_id]
        return SamplingRow(s.params, s.token_ids, s.num_prompt_tokens, s.seed)

    def _prompt_logprobs(
        self, inputs: StepInputs, hidden: torch.Tensor, result: ModelRunnerOutput
    ) -> None:
        """Logprob of each prompt token given its prefix, for requests that ask."""
        for i, request_id in enumerate(inputs.request_ids):
            state = self.batch.states[request_id]
            if state.params.prompt_logprobs is None:
                continue
            lo, hi = int(inputs.query_start_loc[i]), int(inputs.query_start_loc[i + 1])
            start = int(inputs.seq_lens[i]) - (hi - lo)
            # position p predicts token p + 1; only prompt tokens count
            end = min(start + (hi - lo), state.num_prompt_tokens - 1)
            if end > start:
                logprobs = self.model.compute_logits(hidden[lo : lo + end - start]).float()
                logprobs = logprobs.log_softmax(dim=-1)
                targets = torch.tensor(state.token_ids[start + 1 : end + 1], device=self.device)
                state.prompt_logprobs.extend(logprobs.gather(1, targets[:, None])[:, 0].tolist())
            if request_id in inputs.sampling_ids and state.num_prompt_tokens == len(
                state.token_ids
            ):
                result.prompt_logprobs[request_id] = [None, *state.prompt_logprobs]
