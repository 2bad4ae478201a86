"""The engine: tokenize + validate, then each step is schedule -> execute -> update."""

import copy
import itertools
import logging
import secrets
import time
import weakref

from vllm_runner.config import EngineArgs, ModelConfig
from vllm_runner.engine.gc_pauses import FullCollections, freeze_startup_objects
from vllm_runner.engine.input_processor import EngineLimits, InputProcessor, prompt_text
from vllm_runner.engine.kv_cache_manager import KVCacheManager
from vllm_runner.engine.output_processor import (
    RequestState,
    apply_step_output,
    new_request_state,
    stream_output,
)
from vllm_runner.engine.outputs import ModelRunnerOutput, SchedulerOutput, StreamOutput
from vllm_runner.engine.request import Request, RequestStatus
from vllm_runner.engine.sampling_defaults import generation_folder, read_sampling_defaults
from vllm_runner.engine.scheduler import Scheduler
from vllm_runner.lora.request import LoRARequest
from vllm_runner.model.layers.prequantized import resolve_quantization
from vllm_runner.model.loader import resolve_model_path
from vllm_runner.pooling_params import PoolingParams
from vllm_runner.sample.bad_words import bad_word_token_ids
from vllm_runner.sample.guided_choice import choice_token_ids
from vllm_runner.sample.guided_setup import GuidedSetup
from vllm_runner.sampling_params import SamplingParams
from vllm_runner.tokenizer import eos_token_ids, load_hf_config, load_tokenizer
from vllm_runner.worker.model_runner import ModelRunner, StepHandle

logger = logging.getLogger(__name__)


class EngineCore:
    """Single-threaded: callers serialise access (LLM directly, AsyncLLM via its step loop, a
    thread or an engine-core process)."""

    def __init__(self, args: EngineArgs, serving: bool = False) -> None:
        """``serving``: requests arrive online (AsyncLLM), not as one offline batch: the
        default step budget differs, and a request whose prompt + ``max_tokens`` exceed
        ``max_model_len`` is refused (offline, ``max_tokens`` is cut to what fits)."""
        start = time.perf_counter()
        freeze_startup_objects()
        self._gc = FullCollections()
        weakref.finalize(self, self._gc.idle)  # a busy engine dropped still restores them
        args.validate()
        path = resolve_model_path(args.model)
        hf_config = load_hf_config(path)
        sampling_defaults = read_sampling_defaults(path, args.generation_config)
        device = args.resolve_device()
        max_model_len = args.resolve_max_model_len(hf_config)
        self.model_config = ModelConfig(
            path=path,
            name=args.model or _folder_name(path),
            hf_config=hf_config,
            dtype=args.resolve_dtype(hf_config, device),
            device=device,
            max_model_len=max_model_len,
            seed=secrets.randbits(63) if args.seed is None else args.seed,
            quantization=resolve_quantization(args.quantization, hf_config),
            enforce_eager=args.enforce_eager,
            piecewise_max_tokens=args.resolve_piecewise_max_tokens(device, serving),
        )
        self.tokenizer = load_tokenizer(path)
        folder = generation_folder(path, args.generation_config)
        self.eos_ids = eos_token_ids(folder, hf_config, self.tokenizer)
        # (its stop_reason is None; generation_config's other EOS ids name themselves)
        self.eos_id = self.tokenizer.eos_token_id if self.tokenizer is not None else None
        sched_config = args.scheduler_config(max_model_len, device, serving)
        cache_config = args.cache_config()
        self.runner = ModelRunner(self.model_config, cache_config, sched_config, args.lora_config())
        kv = KVCacheManager(self.runner.num_blocks, args.block_size, args.enable_prefix_caching)
        # NOTE: the runner's step budget: it may lower a default one (offloaded weights).
        self.scheduler = Scheduler(self.runner.scheduler_config, kv)
        self.pooler_config = args.pooler_config
        self.limits = EngineLimits(
            model_path=path,
            max_model_len=max_model_len,
            vocab_size=hf_config.vocab_size,
            block_size=args.block_size,
            num_blocks=self.runner.num_blocks,
            serving=serving,
            sampling_defaults=sampling_defaults,
            eos_token_ids=frozenset(self.eos_ids),
            scheduling_policy=args.scheduling_policy,
            hidden_size=self.runner.model.lm_head.weight.shape[1],
            generates=not getattr(self.runner.model, "pooling_only", False),
            lora=self.runner.lora.limits if self.runner.lora is not None else None,
        )
        self.inputs = InputProcessor(self.limits, self.tokenizer)
        graphs, pieces = self.runner.graphs, self.runner.pieces
        logger.info(
            "engine ready in %.1f s: %s (%s, %s), weights loaded in %.1f s, %d KV blocks of %d "
            "tokens (%s), %s%s",
            time.perf_counter() - start,
            self.model_config.name,
            device,
            self.model_config.dtype,
            self.runner.load_seconds,
            self.runner.num_blocks,
            args.block_size,
            str(self.runner.kv_dtype).removeprefix("torch."),
            f"{len(graphs.graphs)} decode CUDA graphs in {graphs.capture_seconds:.1f} s"
            if graphs is not None and graphs.graphs
            else "no CUDA graphs",
            f", piecewise graphs of {pieces.buckets[0]}..{pieces.buckets[-1]} tokens in "
            f"{pieces.capture_seconds:.1f} s"
            if pieces is not None and pieces.graphs
            else "",
        )
        self.states: dict[str, RequestState] = {}
        self.child_to_state: dict[str, tuple[RequestState, int]] = {}
        self.finished: list[RequestState] = []
        self.overlap = (
            device.type == "cuda" if args.async_scheduling is None else args.async_scheduling
        )
        self.pending: tuple[SchedulerOutput, StepHandle] | None = None
        self.num_host_bound = 0  # live requests whose sampling needs host token values
        self._ids = itertools.count()
        self._engine_ids = itertools.count()
        self.guided = GuidedSetup(self.inputs.tokenizer, self.runner.model)

    @property
    def max_model_len(self) -> int:
        return self.model_config.max_model_len

    # ---- input ----------------------------------------------------------------------------
    def add_request(
        self,
        prompt: str | list[int] | dict,
        params: SamplingParams | PoolingParams,
        request_id: str | None = None,
        prompt_ids: list[int] | None = None,
        detokenize: bool = True,
        arrival_time: float | None = None,
        priority: int = 0,
        lora_request: LoRARequest | None = None,
    ) -> RequestState:
        """``params``: PoolingParams for an embedding request (its prompt is computed, its
        final hidden states pooled by the engine's ``pooler_config``, no token sampled).
        ``prompt_ids``: ``prompt`` already tokenized (a front end that checked it).
        ``detokenize``: False when the caller builds the text from the token ids itself (a
        front end apart from the engine process): the outputs' text stays empty. Stop
        strings need the text here (the request ends at the token that completes one).
        ``arrival_time``: the ``time.monotonic()`` its latencies count from (default: now).
        ``priority``: under ``scheduling_policy="priority"``, lower is served earlier (its
        n > 1 completions alike); under "fcfs" only 0 is taken. ``lora_request``: the LoRA
        adapter it runs with (``enable_lora``), loaded here if it is not."""
        if prompt_ids is None:
            prompt_ids = self.inputs.tokenize(prompt, params=params)
        self.inputs.validate(prompt_ids, params, lora_request)
        priority = self.inputs.check_priority(priority)
        if lora_request is not None:
            self.runner.lora.add(lora_request)
        pooling = None
        if isinstance(params, PoolingParams):
            pooling, params = self._pooling(params), _EMBEDDING_RUN
        detokenize = detokenize and params.detokenize
        if not detokenize and params.stop:
            raise ValueError(
                f"stop={params.stop!r} needs detokenize=True: the engine ends a request at the "
                "token that completes a stop string"
            )
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.states:
            raise ValueError(f"request_id {request_id!r} is already in use")
        # NOTE: a copy: the caller's object may be in use by another engine (another model,
        # other EOS ids) whose running requests read it each step. (Shallow, not
        # dataclasses.replace: validated already, not again.)
        params = copy.copy(params)
        params.all_stop_token_ids = self.eos_ids
        params.eos_token_id = self.eos_id
        if params.bad_words:
            params.bad_words_token_ids = bad_word_token_ids(
                self.inputs.tokenizer, params.bad_words, self.inputs.limits.vocab_size
            )
        if params.guided_choice:
            params.guided_choice_token_ids = choice_token_ids(
                self.inputs.tokenizer, params.guided_choice
            )
        if params.json_object or params.guided_pattern or params.guided_grammar:
            self.guided.prepare(self.runner.sampler, params)
        state = new_request_state(
            request_id,
            prompt_text(prompt),
            prompt_ids,
            params,
            self.tokenizer if detokenize else None,
            f"{request_id}@{next(self._engine_ids)}",
            pooling,
        )
        if arrival_time is not None:
            state.arrival_time = arrival_time
        max_tokens = self.inputs.max_new_tokens(len(prompt_ids), params)
        for index, child_id in enumerate(state.child_ids):
            seed = None if params.seed is None else params.seed + index
            self.scheduler.add_request(
                Request(
                    child_id,
                    prompt_ids,
                    params,
                    max_tokens,
                    seed=seed,
                    priority=priority,
                    pooling=pooling,
                    lora_request=lora_request,
                )
            )
            self.child_to_state[child_id] = (state, index)
        self.states[request_id] = state
        self.num_host_bound += _host_bound(params)
        return state

    def _pooling(self, params: PoolingParams) -> PoolingParams:
        """A copy of an embedding request's params with the engine's pooler_config filled in
        (the caller's object may be another engine's request too)."""
        pooling = copy.copy(params)
        pooling.pooling_type = self.pooler_config.pooling_type
        if pooling.normalize is None:
            pooling.normalize = self.pooler_config.normalize
        return pooling

    def abort(self, request_id: str) -> list[StreamOutput]:
        """Stop a request and free its blocks; returns the final output of each completion
        that was still going."""
        state = self.states.get(request_id)
        if state is None:
            return []
        outputs = []
        for index, child_id in enumerate(state.child_ids):
            self.scheduler.finish_request(child_id, RequestStatus.FINISHED_ABORTED)
            if state.completions[index].finish_reason is None:
                state.completions[index].finish_reason = "abort"
                outputs.append(stream_output(state, index, [], None))
        self._forget_if_finished(state)
        if not self.has_unfinished():  # the last request can end here, without a step
            self._went_idle()
        return outputs

    def pop_finished(self) -> list[RequestState]:
        """Requests that finished since the last call."""
        finished, self.finished = self.finished, []
        return finished

    # ---- the step -------------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self.pending is not None

    def step(self, stream: bool = True) -> list[StreamOutput]:
        """One engine step. With ``stream`` off (offline use) no per-token outputs are built;
        results are read from the finished request states.

        On CUDA, when no request needs host-side values (prompt logprobs), steps overlap:
        step N + 1 is scheduled and launched before step N's results are read, so the GPU
        never waits for the host's bookkeeping. Full garbage collections wait while
        requests run (``gc_pauses``).
        """
        self._gc.busy()
        try:
            return self._step(stream)
        finally:
            if not self.has_unfinished():
                self._went_idle()

    def _went_idle(self) -> None:
        """No request left: full collections may run, and the runner forgets the finished
        requests now (it would keep their token lists until the next step)."""
        self._gc.idle()
        self.runner.release(self.scheduler.take_finished_ids())

    def _step(self, stream: bool) -> list[StreamOutput]:
        overlap = self.overlap and self.num_host_bound == 0
        if not overlap and self.pending is not None:
            return self._finish_pending(stream)
        sched = self.scheduler.schedule()
        try:
            handle = self.runner.launch(sched, overlap)
        except Exception as e:  # a failed forward fails its requests, not the engine
            logger.exception("model step failed")
            # The step launched before it finishes first: its results stand, and the next
            # launch may stage into the host buffer its inputs are copied from.
            done = self._finish_pending(stream) if self.pending is not None else []
            return done + self._fail(list(sched.num_scheduled_tokens), f"engine step failed: {e!r}")
        except BaseException as e:  # e.g. Ctrl-C in LLM.generate, mid-forward
            # NOTE: the step's blocks are in the prefix index since scheduling, their KV half
            # written: its requests fail, which takes those blocks out of the index.
            self._fail(list(sched.num_scheduled_tokens), f"engine step interrupted: {e!r}")
            raise
        if not overlap:
            return self._process(sched, self.runner.wait(handle), stream)
        outputs = self._finish_pending(stream) if self.pending is not None else []
        if not sched.is_empty:
            self.pending = (sched, handle)
        return outputs

    def _finish_pending(self, stream: bool) -> list[StreamOutput]:
        sched, handle = self.pending
        self.pending = None
        try:
            result = self.runner.wait(handle)
        except Exception as e:
            logger.exception("model step failed")
            return self._fail(list(sched.num_scheduled_tokens), f"engine step failed: {e!r}")
        return self._process(sched, result, stream)

    def _process(
        self, sched: SchedulerOutput, result: ModelRunnerOutput, stream: bool
    ) -> list[StreamOutput]:
        outputs = []
        for out in self.scheduler.update_from_output(sched, result):
            state, index = self.child_to_state[out.request_id]
            try:
                stop = apply_step_output(state, index, out)
            except Exception as e:
                logger.exception("output processing failed for %s", out.request_id)
                outputs.extend(self._fail([out.request_id], f"output processing failed: {e!r}"))
                continue
            if stop is not None:
                self.scheduler.finish_request(out.request_id, RequestStatus.FINISHED_STOPPED)
            if stream:
                outputs.append(
                    stream_output(
                        state,
                        index,
                        out.new_token_ids,
                        out.new_logprobs,
                        out.prompt_logprobs,
                        out.prompt_ranks,
                    )
                )
            if state.completions[index].finish_reason is not None:  # (else none ended here)
                self._forget_if_finished(state)
        return outputs

    def _fail(self, child_ids: list[str], message: str) -> list[StreamOutput]:
        outputs = []
        for child_id in child_ids:
            entry = self.child_to_state.get(child_id)
            self.scheduler.finish_request(child_id, RequestStatus.FINISHED_ERROR)
            if entry is None:
                continue
            state, index = entry
            state.error = message
            state.completions[index].finish_reason = "error"
            outputs.append(stream_output(state, index, [], None))
            self._forget_if_finished(state)
        return outputs

    def _forget_if_finished(self, state: RequestState) -> None:
        if state.finished and self.states.get(state.request_id) is state:
            del self.states[state.request_id]
            for child_id in state.child_ids:
                self.child_to_state.pop(child_id, None)
            self.finished.append(state)
            self.num_host_bound -= _host_bound(state.params)

    def stats(self) -> dict[str, int]:
        return {
            **self.scheduler.stats(),
            **self.runner.weight_bytes,  # weight_bytes_resident / weight_bytes_offloaded
            "kv_cache_bytes": self.runner.kv_cache_bytes,
        }


# What an embedding request's engine request runs with: room for one token that is never
# sampled (the runner pools its last prompt chunk instead), greedy (no sampler rows), no text.
_EMBEDDING_RUN = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)


def _host_bound(params: SamplingParams) -> bool:
    """Whether a request needs synchronous steps: prompt logprobs are read on the host in
    the step that computes them, and a JSON or regex row's mask follows its newest token on
    the host (sampled tokens' logprobs are copied with the ids, and penalties count in-flight
    tokens on the device); a grammar row's too."""
    masked = params.json_object or params.guided_pattern or params.guided_grammar
    return params.prompt_logprobs is not None or bool(masked)


def _folder_name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]
