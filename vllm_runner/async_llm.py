"""AsyncLLM: one persistent step loop that many callers feed.

The loop (``engine.serving_loop``) owns the EngineCore, so the engine itself needs no locks;
requests join and leave between steps. It runs in an engine-core process of its own (the
default on CUDA) or in a background thread. Callers check their requests here, send
commands to the loop and read their request's asyncio.Queue.
"""

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from typing import Any

from vllm_runner import beam_search as beams
from vllm_runner.engine.core import EngineCore
from vllm_runner.engine.engine_client import EngineClient
from vllm_runner.engine.errors import EngineDeadError, OutputFailed, RequestError, raise_if_failed
from vllm_runner.engine.input_processor import InputProcessor, request_ids, stream_request_id
from vllm_runner.engine.loop_threads import (
    StoppedEngine,
    start_loop_thread,
    start_reader_thread,
    stop_when_collected,
)
from vllm_runner.engine.outputs import (
    EmbeddingRequestOutput,
    FinalOutput,
    RequestOutput,
    StreamOutput,
)
from vllm_runner.engine.serving_loop import Delivery
from vllm_runner.engine.stream_route import StreamRoute, detokenizers_here, hand_over, take_merged
from vllm_runner.llm import Prompt, apply_chat_template, engine_args, normalize_batch
from vllm_runner.lora.request import LoRARequest, lora_requests
from vllm_runner.pooling_params import PoolingParams
from vllm_runner.sampling_params import SamplingParams
from vllm_runner.tokenizer import load_tokenizer

Params = SamplingParams | PoolingParams  # a generating request's, or an embedding request's


class AsyncLLM:
    def __init__(
        self,
        model: str | None = None,
        *,
        model_name: str | None = None,
        served_model_name: str | None = None,
        log_stats: bool = False,
        engine_process: bool | None = None,
        shared_engine: str | None = None,
        **kwargs,
    ) -> None:
        """``served_model_name``: the id clients name the model by (default: the model's).

        ``engine_process``: run the engine core in a process of its own (None: on CUDA).
        A server's event loop and HTTP work then no longer share a GIL with the step loop,
        whose host work feeds the GPU. Otherwise the loop is a thread, which builds the
        engine it steps: on the CPU, PyTorch's OpenMP work from a second thread runs a second
        thread team beside the first, and the two share the cores (a CPU engine loaded in
        one thread and stepped in another ran 23-40% slower; loadtests/RESULTS.md).

        ``shared_engine``: a name; the AsyncLLMs of this user's processes that give the same
        name (and the same engine arguments) share one engine process: the first starts it,
        the others connect to it (a server's workers: more HTTP capacity, one copy of the
        weights). It runs until the last of them has shut down or exited."""
        args = engine_args(
            model, model_name, kwargs, log_stats=log_stats, engine_process=engine_process
        )
        if engine_process is None:
            engine_process = shared_engine is not None or args.engine_apart_by_default()
        if shared_engine is not None and not engine_process:
            raise ValueError(
                f"shared_engine={shared_engine!r} needs engine_process=True (a shared engine "
                "runs in a process of its own)"
            )
        self.engine: EngineCore | None = None  # the loop thread's engine (none in a process)
        self.error: str | None = None  # why the loop stopped on its own, if it did
        self._client: EngineClient | None = None  # its link to an engine process
        self._routes = itertools.count()
        self._entries: dict[int, StreamRoute] = {}  # route -> the stream that added it
        self._streams: set[str] = set()  # request ids of open streams
        self._running = False
        self._go = threading.Event()  # the loop may start (or, on an error here, end)
        self._joining: asyncio.Task | None = None  # shutdown()'s wait, from a coroutine
        try:  # (interrupted while loading, e.g. Ctrl-C: the loop's thread or process ends)
            if engine_process:
                limits, self._stats, name = self._start_process(args, log_stats, shared_engine)
                self.tokenizer = load_tokenizer(limits.model_path)
                self.inputs = InputProcessor(limits, self.tokenizer)
            else:
                self._start_thread(args, log_stats)
                self.tokenizer = self.engine.tokenizer
                self.inputs = self.engine.inputs
                self._stats, name = self.engine.stats(), self.engine.model_config.name
            self.model_name = served_model_name or name
            self.max_model_len = self.inputs.limits.max_model_len
            self.metrics = None
            if log_stats:
                from vllm_runner.metrics import EngineMetrics

                self.metrics = EngineMetrics(self.model_name)
                # NOTE: a thread's engine is ours alone: its gauges show from the start. An
                # engine process chooses its publisher (the hand-over sets them).
                self.metrics.record_step(self._stats, publish=not engine_process)
            # NOTE: the loop's thread holds this object weakly: collected unshut, it stops
            # the loop (its engine process, or only this front end of a shared one)
            self._stop = stop_when_collected(self, self._send_command)
            self._running = True
            if engine_process:  # (now reading its results; and whether it publishes them)
                self._send(("ready", self.metrics is not None))
        finally:
            if not self._running and self._client is not None:
                self._client.close_after_failed_start()
            self._go.set()

    def _start_thread(self, args, log_stats: bool) -> None:
        self._thread, self.engine, self._send_command = start_loop_thread(
            self, lambda: EngineCore(args, serving=True), self._go, log_stats
        )

    def _start_process(self, args, log_stats: bool, shared: str | None) -> tuple:
        self._client = EngineClient()
        limits, stats, name = self._client.start(args, log_stats, shared)
        self._send_command = self._client.send
        self._thread = start_reader_thread(self, self._client, self._go)
        return limits, stats, name

    # ---- public API ------------------------------------------------------------------------
    def validate(
        self, prompt: Prompt, params: SamplingParams, chat: bool = False, fit: bool = False,
        lora_request: LoRARequest | None = None,
    ) -> list[int]:  # fmt: skip
        """The prompt's token ids once it passed every check (``chat``: a chat template's text,
        ``InputProcessor.tokenize``'s; ``fit``: as a route checks it, ``InputProcessor.fit``)."""
        ids = self.inputs.tokenize(prompt, chat, params)
        self.inputs.validate(ids, self.inputs.fit(ids, params) if fit else params, lora_request)
        return ids

    def check_text_length(self, text: str, what: str) -> None:  # (the /score route's)
        self.inputs.check_text_length(text, what)

    def apply_chat_template(self, messages: list[dict], **options: Any) -> str:
        """The conversation as the prompt text (``options``: ``LLM.chat``'s). NOTE: a server's
        chat route calls it, whose clients cannot give a template: the advice is theirs."""
        name, way_out = self.model_name, "completions"
        return apply_chat_template(self.tokenizer, messages, name, way_out, False, **options)

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams of the model's sampling defaults (its generation_config.json; none
        with ``generation_config="vllm"``): what ``generate`` / ``stream`` use given none (a
        max_tokens past what max_model_len leaves a prompt cut to fit, as the server does)."""
        return SamplingParams(**self.inputs.limits.sampling_defaults)

    async def get_tokenizer(self):
        """The model's HF tokenizer (None for a folder without one); awaited, as vLLM's."""
        return self.tokenizer

    async def stream(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        priority: int = 0,
        lora_request: LoRARequest | None = None,
    ) -> AsyncIterator[StreamOutput]:
        """Yield each completion's text deltas as they are produced. Leaving the loop early
        (or cancellation, e.g. a client disconnect) aborts the request. ``priority``: as
        vLLM's, lower is served earlier (non-zero only with ``scheduling_policy="priority"``)."""
        params = params or self.inputs.default_params(prompt)
        # NOTE: aclosing: closing this generator closes _run at once (its abort), not later
        # when the collector finalizes it.
        run = self._run(prompt, params, request_id, priority, lora_request)
        async with contextlib.aclosing(run) as items:
            async for item in items:
                if isinstance(item, StreamOutput):
                    yield item

    async def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        priority: Sequence[int] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """All prompts together; returns finished outputs in prompt order. ``priority``,
        ``lora_request``: as ``LLM.generate``'s."""
        default = self.get_default_sampling_params()
        prompts, params = normalize_batch(prompts, sampling_params, default)
        priorities = self.inputs.priorities(priority, len(prompts))
        loras = lora_requests(lora_request, len(prompts))
        if sampling_params is None:  # (a default max_tokens fitted to each prompt)
            params = [self.inputs.default_params(p) for p in prompts]
        for prompt, p, lora in zip(prompts, params, loras, strict=True):  # all, before any add
            self.validate(prompt, p, lora_request=lora)
        jobs = zip(prompts, params, [None] * len(prompts), priorities, loras, strict=True)
        results = await asyncio.gather(
            *(self._collect(*job) for job in jobs), return_exceptions=True
        )
        return raise_if_failed(results)

    async def beam_search(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: beams.BeamSearchParams,
        *,
        priority: int = 0,
    ) -> list[beams.BeamSearchOutput]:
        """As ``LLM.beam_search``: each round's beams are requests at ``priority``."""
        prompts, _ = normalize_batch(prompts, None, SamplingParams())
        searches = beams.start(self.inputs, prompts, params)
        while asked := beams.round_prompts(searches):
            ids = [tokens for _, tokens in asked]
            each = [beams.round_params(params)] * len(ids)
            outs = await self.generate(ids, each, priority=[priority] * len(ids))
            beams.advance(searches, asked, [o.outputs[0].logprobs[0] for o in outs])
        return beams.results(searches, self.tokenizer)

    async def embed(
        self,
        prompt: Prompt,
        pooling_params: PoolingParams | None = None,
        request_id: str | None = None,
        *,
        priority: int = 0,
    ) -> EmbeddingRequestOutput:
        """``LLM.embed`` for one prompt (it shares steps with generating requests).
        Cancelling the call aborts the request."""
        return await self._collect(prompt, pooling_params or PoolingParams(), request_id, priority)

    async def _collect(self, *run: Any) -> FinalOutput:
        """The final output of ``_run(*run)``."""
        async with contextlib.aclosing(self._run(*run)) as items:
            async for item in items:
                if isinstance(item, FinalOutput):
                    return item
        raise RequestError("request ended without a final output")

    async def _run(
        self, prompt: Prompt, params: Params, request_id: str | None, priority: int,
        lora: LoRARequest | None = None,
    ) -> AsyncIterator[StreamOutput | FinalOutput]:  # fmt: skip
        # NOTE: its latencies count from here, not from when the engine's loop adds it (after
        # the step running now): CLOCK_MONOTONIC, one clock for every process of the host.
        arrival = time.monotonic()
        prompt_ids = self.validate(prompt, params, lora_request=lora)
        priority = self.inputs.check_priority(priority)
        self._check_running()
        request_id = stream_request_id(request_id)
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        q: asyncio.Queue = asyncio.Queue()
        route = next(self._routes)
        detokenizers = self._detokenizers_here(prompt_ids, params)  # (None: the engine's)
        loop = asyncio.get_running_loop()
        self._entries[route] = StreamRoute(loop, q, request_id, prompt_ids, detokenizers)
        try:  # NOTE: again, registered: a loop that died since failed the streams it saw
            self._check_running()
        except RuntimeError:
            del self._entries[route]
            raise
        self._streams.add(request_id)
        done = False
        released = False  # the request ended: its id is free already, no abort
        held: collections.deque = collections.deque()  # taken from the queue, not yet yielded
        try:
            detokenize = detokenizers is None  # (the engine builds the text)
            request = (prompt, prompt_ids, params, detokenize, arrival, priority, lora)
            self._send(("add", request_id, route, *request))
            while not done:
                if not held:
                    await take_merged(q, held)
                item = held.popleft()
                if isinstance(item, Exception):
                    # (one of building its text here: the engine still runs it, aborted below)
                    done = not isinstance(item, OutputFailed)
                    raise item
                if isinstance(item, StreamOutput) and item.error is not None:
                    # (not done: n > 1 siblings of the failed completion are aborted)
                    raise RequestError(f"request {request_id} failed: {item.error}")
                done = isinstance(item, FinalOutput)
                if not released and (done or (held and isinstance(held[-1], FinalOutput))):
                    # NOTE: its final output is here (it comes with the last update): the id
                    # is free before that update is yielded, for a caller that stops reading
                    # at `finished` and reuses the id at once (this stream is closed later).
                    released = True
                    self._streams.discard(request_id)
                yield item
        finally:
            # NOTE: the abort before the id is free: a stream that reuses the id next (another
            # thread's) is added after it, and not aborted by it.
            if not released:
                try:
                    if not done:
                        self._send(("abort", request_id))
                finally:
                    self._streams.discard(request_id)

    def _check_running(self) -> None:
        if not self._running:
            error = self.error
            raise EngineDeadError(error) if error else RuntimeError("AsyncLLM is shut down")

    async def check_health(self) -> None:
        """As vLLM's: None while it runs; EngineDeadError (why its loop died) or RuntimeError."""
        self._check_running()

    @property
    def is_running(self) -> bool:
        return self._running

    @property
    def errored(self) -> bool:
        """As vLLM's: the engine takes no more requests (its loop died, or it was shut down)."""
        return not self._running

    async def abort(self, request_id: str | Iterable[str]) -> None:
        for r in request_ids(request_id):  # one, or several as vLLM's
            self._send(("abort", r))

    def stats(self) -> dict[str, int]:
        return dict(self._stats)

    def shutdown(self) -> Awaitable[None]:
        """Stop the engine (its loop, or this front end of its engine process), as vLLM's plain
        call: outside an event loop it returns once they have ended; from a coroutine they end
        on their own (a wait would hold up the event loop; ``await llm.shutdown()`` waits)."""
        if not self._running:
            return StoppedEngine()
        self._running = False
        self._stop()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._join()
            return StoppedEngine()
        # NOTE: a task, not a coroutine: a caller that drops it (vLLM's plain call) gets no
        # "never awaited" warning, and the wait still runs
        self._joining = loop.create_task(asyncio.to_thread(self._join))
        return self._joining

    def _join(self) -> None:
        self._thread.join()
        if self._client is not None:
            self._client.join()
            if self._client.shared and self.metrics is not None:
                # (another front end publishes the shared engine's gauges from now on)
                self.metrics.record_step(self._stats, publish=False)

    async def __aenter__(self) -> "AsyncLLM":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.shutdown()

    def _detokenizers_here(self, prompt_ids: list[int], params: Params) -> list | None:
        return detokenizers_here(self._client is not None, self.tokenizer, prompt_ids, params)

    # ---- the loop's side -------------------------------------------------------------------
    def _send(self, command: tuple) -> None:
        try:
            self._send_command(command)
        except OSError:  # the engine process is gone (its reader fails the streams)
            if command[0] == "add":  # (shut down meanwhile by another thread, or died)
                self._check_running()
                raise EngineDeadError("the engine process has exited") from None

    def _deliver(self, delivery: Delivery) -> None:
        """A step's results to the streams (from the loop thread, or the thread that reads
        the engine process's results)."""
        # NOTE: stats and metrics first: a caller that sees its request finish also sees
        # that step's stats (its blocks freed) and its request counted.
        self._stats = delivery.stats
        if self.metrics is not None:
            self.metrics.record_step(delivery.stats, publish=delivery.publish_stats)
            for _, timings in delivery.timings:
                self.metrics.record_request(**dataclasses.asdict(timings))
        hand_over(self._entries, delivery.items)

    def _loop_stopped(self, reason: str | None) -> None:
        """The loop stopped on its own (``reason``: a bug, or the engine process died): every
        open stream fails with the reason and new requests are refused with it. Stopped as
        told (None): the streams left sent their requests as another thread shut it down."""
        if reason is not None and self._running:
            self.error = reason
            self._running = False
        if reason is None and not self._entries:  # (the usual stop: no stream left)
            return
        failed = [
            (route, EngineDeadError(reason) if reason else RuntimeError("AsyncLLM is shut down"))
            for route in list(self._entries)
        ]
        self._deliver(Delivery(failed, self._stats, publish_stats=False))
