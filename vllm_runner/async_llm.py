"""AsyncLLM: one persistent step loop (a background thread) that many callers feed.

Callers put commands on a queue and read their request's asyncio.Queue; the loop thread owns
the EngineCore, so the engine itself needs no locks. Requests join and leave between steps.
"""

import asyncio
import collections
import contextlib
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence

from vllm_runner.engine.core import EngineCore
from vllm_runner.engine.outputs import RequestOutput, StreamOutput, merge_updates
from vllm_runner.llm import Prompt, apply_chat_template, engine_args, normalize_batch
from vllm_runner.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class RequestError(RuntimeError):
    """The engine failed this request (other requests are unaffected). From `generate`,
    `results` holds every prompt's RequestOutput or RequestError, in prompt order."""

    def __init__(self, message: str, results: list | None = None) -> None:
        super().__init__(message)
        self.results = results


class AsyncLLM:
    def __init__(
        self,
        model: str | None = None,
        *,
        model_name: str | None = None,
        served_model_name: str | None = None,
        log_stats: bool = False,
        **kwargs,
    ) -> None:
        """``served_model_name``: the id clients name the model by (default: the model's).

        The engine is built in the loop thread that then steps it: on the CPU, PyTorch's
        OpenMP work from a second thread runs a second thread team beside the first, and
        the two share the cores (a CPU engine loaded in one thread and stepped in another
        ran 23-40% slower; loadtests/RESULTS.md)."""
        args = engine_args(model, model_name, kwargs)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        # The loop thread's own routes: each request's outputs go to the stream that added
        # it, even after that stream closed and a new one took its id.
        self._routes: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        built, go = threading.Event(), threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                self.engine = EngineCore(args, serving=True)
            except BaseException as exc:  # raised again in the caller's thread
                failure.append(exc)
                return
            finally:
                built.set()
            go.wait()
            if self._running:
                self._loop()

        self._running = False
        self._thread = threading.Thread(target=run, name="vllm-runner-engine", daemon=True)
        try:  # (interrupted while loading, e.g. Ctrl-C: the thread ends, the engine goes)
            self._thread.start()
            built.wait()
            if failure:
                raise failure[0]
            self.tokenizer = self.engine.tokenizer
            self.model_name = served_model_name or self.engine.model_config.name
            self.max_model_len = self.engine.max_model_len
            self.metrics = None
            if log_stats:
                from vllm_runner.metrics import EngineMetrics

                self.metrics = EngineMetrics(self.model_name)
            self._stats: dict[str, int] = self.engine.stats()
            self._running = True
        finally:
            go.set()  # the loop starts, or (on an error here) the thread ends

    # ---- public API ------------------------------------------------------------------------
    def validate(self, prompt: Prompt, params: SamplingParams) -> list[int]:
        ids = self.engine.tokenize(prompt)
        self.engine.validate(ids, params)
        return ids

    def check_text_length(self, text: str, what: str) -> None:
        self.engine.check_text_length(text, what)

    def apply_chat_template(self, messages: list[dict], **options: bool) -> str:
        return apply_chat_template(self.tokenizer, messages, **options)

    async def stream(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[StreamOutput]:
        """Yield each completion's text deltas as they are produced. Leaving the loop early
        (or cancellation, e.g. a client disconnect) aborts the request."""
        # NOTE: aclosing: closing this generator closes _run at once (its abort), not later
        # when the collector finalizes it.
        async with contextlib.aclosing(
            self._run(prompt, params or SamplingParams(), request_id)
        ) as items:
            async for item in items:
                if isinstance(item, StreamOutput):
                    yield item

    async def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """All prompts together; returns finished outputs in prompt order."""
        prompts, params = normalize_batch(prompts, sampling_params)
        for prompt, p in zip(prompts, params, strict=True):  # validate all before adding any
            self.validate(prompt, p)
        results = await asyncio.gather(
            *(self._collect(prompt, p) for prompt, p in zip(prompts, params, strict=True)),
            return_exceptions=True,
        )
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, RequestError):
                raise r
        failed = [r for r in results if isinstance(r, RequestError)]
        if failed:
            # NOTE: raised once every request has ended, with all the results, so that a
            # caller serving many clients in one call can fail only the failed ones.
            raise RequestError(str(failed[0]), results)
        return results

    async def _collect(self, prompt: Prompt, params: SamplingParams) -> RequestOutput:
        async with contextlib.aclosing(self._run(prompt, params, None)) as items:
            async for item in items:
                if isinstance(item, RequestOutput):
                    return item
        raise RequestError("request ended without a final output")

    async def _run(
        self, prompt: Prompt, params: SamplingParams, request_id: str | None
    ) -> AsyncIterator[StreamOutput | RequestOutput]:
        self.validate(prompt, params)
        if not self._running:
            raise RuntimeError("AsyncLLM is shut down")
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = entry = (asyncio.get_running_loop(), q)
        self._send(("add", request_id, prompt, params, entry))
        done = False
        held: collections.deque = collections.deque()  # taken from the queue, not yet yielded
        try:
            while not done:
                if not held:
                    items = [await q.get()]
                    while not q.empty():
                        items.append(q.get_nowait())
                    # NOTE: a consumer that fell behind (a busy event loop, a slow client)
                    # gets the updates waiting for it as one: fewer, larger chunks.
                    held.extend(merge_updates(items))
                item = held.popleft()
                if isinstance(item, Exception):
                    done = True
                    raise item
                if isinstance(item, StreamOutput) and item.error is not None:
                    done = True
                    raise RequestError(f"request {request_id} failed: {item.error}")
                done = isinstance(item, RequestOutput)
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not done:
                self._send(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def stats(self) -> dict[str, int]:
        return dict(self._stats)

    async def shutdown(self) -> None:
        if not self._running:
            return
        self._running = False
        self._send(("stop",))
        await asyncio.to_thread(self._thread.join)

    async def __aenter__(self) -> "AsyncLLM":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.shutdown()

    # ---- the loop thread -------------------------------------------------------------------
    def _send(self, command: tuple) -> None:
        self._commands.put(command)
        self._wake.set()

    def _loop(self) -> None:
        while True:
            if not self._drain_commands():
                return
            outputs = self.engine.step() if self.engine.has_unfinished() else []
            # NOTE: the stats before the outputs: a caller that sees its request finish also
            # sees that step's stats (its blocks freed), not the step before.
            self._stats = self.engine.stats()
            self._dispatch(outputs)
            if self.metrics is not None:
                self.metrics.record_step(self._stats)
            if not self.engine.has_unfinished():
                self._wake.wait(timeout=1.0)
                self._wake.clear()

    def _drain_commands(self) -> bool:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True
            if command[0] == "stop":
                for request_id in list(self.engine.states):
                    self._dispatch(self.engine.abort(request_id))
                while self.engine.has_unfinished():  # a launched step: finish it, go idle
                    self._dispatch(self.engine.step())
                return False
            if command[0] == "abort":
                self._dispatch(self.engine.abort(command[1]))
                continue
            _, request_id, prompt, params, entry = command
            self._routes[request_id] = entry
            try:
                self.engine.add_request(prompt, params, request_id)
            except Exception as e:  # validated already; anything here is this request's alone
                self._push(request_id, e)
                del self._routes[request_id]

    def _dispatch(self, outputs: list[StreamOutput]) -> None:
        # NOTE: one hand-over per event loop and step (each wakes the loop with a syscall),
        # not one per request.
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}

        def add(request_id: str, item: object) -> None:
            entry = self._routes.get(request_id)
            if entry is not None:
                batches.setdefault(entry[0], []).append((entry[1], item))

        for out in outputs:
            add(out.request_id, out)
        for state in self.engine.pop_finished():
            add(state.request_id, state.final_output())
            self._routes.pop(state.request_id, None)
            if self.metrics is not None:
                self._record_metrics(state)
        for loop, items in batches.items():
            loop.call_soon_threadsafe(_deliver, items)

    def _record_metrics(self, state) -> None:
        ttft = (
            None if state.first_token_time is None else state.first_token_time - state.arrival_time
        )
        # per completion, as vLLM's per-child stats: siblings of one step are not 0 s apart
        itl = [
            b - a
            for c in state.completions
            for a, b in zip(c.token_times, c.token_times[1:], strict=False)
        ]
        self.metrics.record_request(
            ttft_s=ttft,
            itl_s=itl,
            e2e_s=time.monotonic() - state.arrival_time,
            finish_reason=state.completions[0].finish_reason or "abort",
        )

    def _push(self, request_id: str, item: object) -> None:
        entry = self._routes.get(request_id)
        if entry is not None:
            loop, q = entry
            loop.call_soon_threadsafe(q.put_nowait, item)


def _deliver(items: list[tuple[asyncio.Queue, object]]) -> None:
    for q, item in items:
        q.put_nowait(item)
