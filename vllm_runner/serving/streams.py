"""Engine streams for HTTP handlers: abort on disconnect, merge, collect."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio

from vllm_runner.engine.errors import RequestError
from vllm_runner.sampling_params import SamplingParams
from vllm_runner.serving.openai_format import OpenAIError

T = TypeVar("T")


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


async def stream_or_abort(
    engine: Any,
    prompt: str | list[int],
    params: SamplingParams,
    request_id: str,
    priority: int = 0,
) -> AsyncIterator[Any]:
    """`engine.stream(...)`, aborting the request if the consumer stops before the end.

    A client disconnect cancels the task that iterates this generator; the abort frees
    the request's KV blocks at once instead of when it would have finished.
    """
    finished = False
    try:
        async for out in engine.stream(prompt, params, request_id=request_id, priority=priority):
            yield out
        finished = True
    finally:
        if not finished:
            # NOTE: shielded: the cancel scope that stopped the stream re-cancels every await.
            with anyio.CancelScope(shield=True):
                await engine.abort(request_id)


async def until_disconnect(receive: Callable[[], Awaitable[dict]], work: Awaitable[T]) -> T | None:
    """``work``'s result, or None once the client disconnects first: ``work`` is then
    cancelled, which aborts its engine requests (``stream_or_abort``) instead of generating
    for nobody. ``receive`` is the request's ASGI receive, whose body was read already: its
    next message is the disconnect."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(task, watcher, return_exceptions=True)
    return None if task.cancelled() else task.result()


async def merge(streams: Sequence[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Interleave several streams as (stream index, item), in arrival order."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any, BaseException | None, bool]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[Any]) -> None:
        try:
            async for item in stream:
                queue.put_nowait((i, item, None, False))
        except Exception as exc:  # handed to the consumer
            queue.put_nowait((i, None, exc, True))
        else:
            queue.put_nowait((i, None, None, True))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item, exc, done = await queue.get()
            if exc is not None:
                raise exc
            if done:
                remaining -= 1
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class Choice:
    """One completion accumulated from a stream."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    prompt_logprobs: list[dict[int, float] | None] | None = None  # when asked
    prompt_ranks: list[int | None] | None = None  # (with them)

    def add(self, out: Any) -> None:
        if out.prompt_logprobs is not None:
            self.prompt_logprobs, self.prompt_ranks = out.prompt_logprobs, out.prompt_ranks
        self.text += out.delta
        self.token_ids.extend(out.new_token_ids)
        if out.new_logprobs:
            self.logprobs.extend(out.new_logprobs)
        if out.finished:
            self.finish_reason, self.stop_reason = out.finish_reason, out.stop_reason


async def collect(
    engine: Any, prompt: str | list[int], params: SamplingParams, request_id: str, priority: int
) -> tuple[list[int], list[Choice]]:
    """Run one request to the end; returns (prompt token ids, the n choices by index)."""
    choices = [Choice(i) for i in range(params.n)]
    prompt_ids: list[int] = []
    async for out in stream_or_abort(engine, prompt, params, request_id, priority):
        prompt_ids = out.prompt_token_ids or prompt_ids
        choices[out.index].add(out)
    return prompt_ids, choices


async def gather(
    engine: Any, ids: list[list[int]], params: list[SamplingParams], rid: str, priority: int = 0
) -> list[tuple[list[int], list[Choice]]]:
    """Each prompt of ``ids`` with its ``params`` (and the request's ``priority``), to the
    end."""
    jobs = enumerate(zip(ids, params, strict=True))
    tasks = [collect(engine, p, sp, f"{rid}-{i}", priority) for i, (p, sp) in jobs]
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for r in results:
        if isinstance(r, RequestError):  # this request alone failed; the engine runs on
            raise OpenAIError(500, str(r), "internal_server_error") from r
        if isinstance(r, BaseException):
            raise r
    return results  # type: ignore[return-value]


async def events(
    engine: Any, ids: list[list[int]], params: list[SamplingParams], rid: str, priority: int = 0
) -> AsyncIterator[tuple[int, Any]]:
    """The updates of each prompt of ``ids`` with its ``params`` (and the request's
    ``priority``): (prompt index, update)."""
    jobs = enumerate(zip(ids, params, strict=True))
    streams = [stream_or_abort(engine, p, sp, f"{rid}-{i}", priority) for i, (p, sp) in jobs]
    async for i, out in merge(streams):
        yield i, out
