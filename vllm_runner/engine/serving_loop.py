"""The step loop AsyncLLM runs: commands applied between steps, each step's results handed on.

It runs in a thread of the serving process, or as the whole of an engine-core process
(``engine_process``): there the engine's Python work (scheduling, launches, output
processing) has a GIL of its own instead of sharing one with the server's
event loop and HTTP stack (vLLM V1 runs its EngineCore apart for the same reason).

Commands: ``("add", request_id, route, prompt, prompt_ids, params, detokenize, arrival,
priority, lora)`` (the ids the front end checked: not tokenized again; ``detokenize`` False: the
front end builds the text from the ids, see ``EngineCore.add_request``; ``arrival``: its
``time.monotonic()`` when the front end got it; ``priority``: its scheduling priority, 0
unless the engine's policy is "priority"; ``lora``: its LoRARequest or None; from an engine
process's front end, what follows the route comes pickled, see ``EngineClient.send``),
``("abort", request_id)``,
``("stop",)``.
A route is what the front end gives each added request (a number; in the engine process,
with the front end's number): outputs go to the stream that added the request even after
that stream closed and another reused its id.
"""

import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from vllm_runner.engine.core import EngineCore
from vllm_runner.engine.errors import RequestError
from vllm_runner.engine.outputs import FinalOutput, StreamOutput


@dataclass
class RequestTimings:
    """A finished request's latencies, for the serving metrics."""

    ttft_s: float | None
    itl_s: list[float]  # per completion, as vLLM's per-child stats (siblings are not 0 s apart)
    e2e_s: float
    # NOTE: per completion, as vLLM counts its n > 1 children in request_success; the
    # latencies above are the request's (its first token, its end)
    finish_reasons: list[str]


@dataclass
class Delivery:
    """One step's results for the front end, in order: a request's stream updates, then its
    final output (``FinalOutput``, or the exception that refused it), which ends its route."""

    items: list[tuple[object, object]]  # (route, StreamOutput | FinalOutput | Exception)
    stats: dict[str, int]  # the engine's stats after the step
    timings: list[tuple[object, RequestTimings]] = field(default_factory=list)  # per route
    # NOTE: of the front ends sharing one engine, one publishes its stats as metrics (each
    # would count the same engine's tokens again); each still counts its own requests.
    publish_stats: bool = True


def is_final(item: object) -> bool:
    return isinstance(item, FinalOutput | BaseException)


class ServingLoop:
    def __init__(self, engine: EngineCore, emit: Callable[[Delivery], None], timings: bool) -> None:
        self.engine = engine
        self.emit = emit
        self.timings = timings
        self.routes: dict[str, object] = {}  # request id -> route, in command order

    def run(self, receive: Callable[[bool], tuple | None]) -> None:
        """Step until a stop command. ``receive(block)``: the next command, or None when
        none is waiting (``block``: wait for one; the engine is idle)."""
        while True:
            block = not self.engine.has_unfinished()
            while (command := receive(block)) is not None:
                if not self.handle(command):
                    return
                block = False
            if self.engine.has_unfinished():
                self._deliver(self.engine.step())

    def handle(self, command: tuple) -> bool:
        """Apply one command; False for stop (every request aborted, the engine idle)."""
        engine = self.engine
        if command[0] == "stop":
            outputs = [out for rid in list(engine.states) for out in engine.abort(rid)]
            while engine.has_unfinished():  # a launched step: finish it, go idle
                outputs += engine.step()
            self._deliver(outputs)
            return False
        if command[0] == "abort":
            self._deliver(engine.abort(command[1]))
            return True
        _, request_id, route, *request = command
        try:
            if len(request) == 1:  # (pickled by a front end in another process)
                request = _load_request(request[0])
            prompt, prompt_ids, params, detokenize, arrival, priority, lora = request
            engine.add_request(
                prompt, params, request_id, prompt_ids, detokenize, arrival, priority, lora
            )
        except Exception as e:  # validated already; anything here is this request's alone
            self.emit(Delivery([(route, e)], engine.stats()))
        else:
            self.routes[request_id] = route
        return True

    def _deliver(self, outputs: list) -> None:
        items = [(self.routes[o.request_id], o) for o in outputs if o.request_id in self.routes]
        timings = []
        for state in self.engine.pop_finished():
            route = self.routes.pop(state.request_id, None)
            if route is not None:
                items.append((route, state.final_output()))
            if self.timings:
                timings.append((route, request_timings(state)))
        # NOTE: the stats with the outputs: a caller that sees its request finish also sees
        # that step's stats (its blocks freed), not the step before.
        self.emit(Delivery(items, self.engine.stats(), timings))


def _load_request(data: bytes) -> list:
    try:
        return pickle.loads(data)
    except Exception as e:
        raise RequestError(
            f"the engine process could not load this request: {e!r} (does it hold an object "
            "of a class that only its caller's process knows, e.g. one defined in a notebook? "
            "send plain str, list and SamplingParams)"
        ) from None


def request_timings(state) -> RequestTimings:
    ttft = None if state.first_token_time is None else state.first_token_time - state.arrival_time
    itl = [
        b - a
        for c in state.completions
        for a, b in zip(c.token_times, c.token_times[1:], strict=False)
    ]
    return RequestTimings(
        ttft_s=ttft,
        itl_s=itl,
        e2e_s=time.monotonic() - state.arrival_time,
        finish_reasons=[c.finish_reason or "abort" for c in state.completions],
    )


def pack(item: object) -> object:
    """A stream update as the pipe carries it: what is new in it. Its request id, prompt ids
    and text so far are the front end's to add back (``unpack``): sent with every update
    they made a 256-stream step's message ~10x larger, and the front end's reading of it
    held back the engine."""
    if not isinstance(item, StreamOutput):
        return item
    return (
        item.index,
        item.delta,
        item.num_token_ids,
        item.new_token_ids,
        item.new_logprobs,
        item.finished,
        item.finish_reason,
        item.stop_reason,
        item.error,
        item.prompt_logprobs,
        item.prompt_ranks,
    )


def unpack(packed: tuple, request_id: str, prompt_ids: list[int], texts: dict[int, str]):
    """The StreamOutput that ``pack`` made ``packed`` from; ``texts``: each completion's text
    so far (updated)."""
    index, delta, num_ids, new_ids, new_logprobs, finished, reason, *rest = packed
    texts[index] = text = texts.get(index, "") + delta
    return StreamOutput(
        request_id, index, delta, text, num_ids, new_ids, new_logprobs, finished, reason,
        prompt_ids, *rest,
    )  # fmt: skip


def with_text(packed: tuple, detokenizers: list) -> tuple:
    """``packed`` (of a request the engine left undetokenized) with its delta, from its new
    ids and its completion's detokenizer."""
    index, _, num_ids, new_ids, new_logprobs, finished, reason, *rest = packed
    detokenizer = detokenizers[index]
    detokenizer.add_tokens(new_ids, reason == "stop")  # (no stop strings: EOS or a stop id)
    delta = detokenizer.take_delta(finished)
    return (index, delta, num_ids, new_ids, new_logprobs, finished, reason, *rest)


def picklable(item: object) -> object:
    """An exception item as it is, if it crosses the pipe intact; else as text."""
    if isinstance(item, BaseException):
        try:  # (one whose __init__ needs more than its args pickles, then fails to load)
            pickle.loads(pickle.dumps(item))
        except Exception:
            return RuntimeError(f"{type(item).__name__}: {item}")
    return item
