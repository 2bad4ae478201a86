"""Where a request's outputs go in the front end (AsyncLLM): its stream's queue and event
loop, and what makes an engine process's outputs whole again there: the request id, prompt
ids and text so far that the pipe leaves out (``serving_loop.pack``), and the text itself
for a request the front end detokenizes; and the hand-over of a step's outputs to the
streams' event loops."""

import asyncio
import collections
import dataclasses
import logging

from vllm_runner.engine.detokenizer import IncrementalDetokenizer
from vllm_runner.engine.errors import OutputFailed
from vllm_runner.engine.outputs import RequestOutput, merge_updates
from vllm_runner.engine.serving_loop import is_final, unpack, with_text
from vllm_runner.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class StreamRoute:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    request_id: str
    prompt_ids: list[int]
    # per completion, when the text is built here (``text_builders``)
    detokenizers: list[IncrementalDetokenizer] | None = None
    texts: dict[int, str] = dataclasses.field(default_factory=dict)  # per completion

    def whole(self, item: object) -> object:
        """An item from an engine process as its stream yields it: a packed update made
        whole again, a final output with its text."""
        if isinstance(item, tuple):
            if self.detokenizers is not None:
                item = with_text(item, self.detokenizers)
            return unpack(item, self.request_id, self.prompt_ids, self.texts)
        if isinstance(item, RequestOutput) and self.detokenizers is not None:
            for completion in item.outputs:
                completion.text = self.detokenizers[completion.index].text
        return item


def detokenizers_here(apart: bool, tokenizer, prompt_ids: list[int], params: object) -> list | None:
    """The detokenizers of a request whose text the front end builds (None: the engine
    builds it, or none is built). With the engine in a process of its own (``apart``), a
    request's text is built in the front end from its token ids, as vLLM V1's front end
    does: the engine process's host work bounds a server's streaming rate (detokenization
    was ~12% of its step loop, profiled on an H200 with 4 workers sharing it), while the
    workers have CPU to spare and share that work out. A request with stop strings is left
    to the engine, which ends it at the token that completes one (and so is every request
    if the front end has no tokenizer: the engine's own decides). detokenize=False: no text
    here nor there; an embedding request (PoolingParams) has none either."""
    if not apart or not isinstance(params, SamplingParams) or tokenizer is None:
        return None
    if params.stop or not params.detokenize:
        return None
    return text_builders(tokenizer, prompt_ids, params)


async def take_merged(q: asyncio.Queue, held: collections.deque) -> None:
    """Wait for a stream's next items and add them to ``held``. NOTE: a consumer that fell
    behind (a busy event loop, a slow client) gets the updates waiting for it as one: fewer,
    larger chunks."""
    items = [await q.get()]
    while not q.empty():
        items.append(q.get_nowait())
    held.extend(merge_updates(items))


def text_builders(
    tokenizer, prompt_ids: list[int], params: SamplingParams
) -> list[IncrementalDetokenizer]:
    """A detokenizer per completion of a request without stop strings, as the engine would
    make it."""
    return [
        IncrementalDetokenizer(
            tokenizer,
            prompt_ids,
            [],
            params.include_stop_str_in_output,  # (a stop token's text, then)
            params.skip_special_tokens,
        )
        for _ in range(params.n)
    ]


def hand_over(routes: dict[int, StreamRoute], items: list[tuple[int, object]]) -> None:
    """A step's ``items`` (route, output) to their streams' queues (``routes``: the open
    ones, by route; a final item closes its route). Called from the thread that delivers
    the step (AsyncLLM's loop thread or engine-process reader)."""
    # NOTE: one hand-over per event loop and step (each wakes the loop with a syscall),
    # not one per request.
    batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}
    for route, item in items:
        entry = routes.pop(route, None) if is_final(item) else routes.get(route)
        if entry is None:
            continue
        try:
            item = entry.whole(item)
        except Exception as e:  # (building its text) this request's alone
            logger.exception("output processing failed for %s", entry.request_id)
            routes.pop(route, None)
            # NOTE: its stream aborts it (as it leaves): not here by id, which a new
            # stream may have taken already if this one has closed.
            item = OutputFailed(
                f"request {entry.request_id} failed: output processing failed: {e!r}"
            )
        batches.setdefault(entry.loop, []).append((entry.queue, item))
    for loop, batch in batches.items():
        try:
            loop.call_soon_threadsafe(_put_all, batch)
        except RuntimeError:  # that event loop closed: its streams have no reader left
            if not loop.is_closed():
                raise


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for q, item in items:
        q.put_nowait(item)
