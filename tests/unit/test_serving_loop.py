"""ServingLoop's commands and deliveries, and the pipe's packing of stream updates, with a
stand-in engine (no model)."""

import pickle
from types import SimpleNamespace

import pytest

from vllm_runner.engine.errors import RequestError
from vllm_runner.engine.outputs import CompletionOutput, RequestOutput, StreamOutput
from vllm_runner.engine.serving_loop import (
    ServingLoop,
    is_final,
    pack,
    picklable,
    unpack,
    with_text,
)
from vllm_runner.engine.stream_route import StreamRoute, text_builders
from vllm_runner.sampling_params import SamplingParams


def _update(rid: str, token: int, finished: bool = False) -> StreamOutput:
    reason = "abort" if finished else None
    return StreamOutput(rid, 0, "", "", 1, [token], None, finished, reason, [1])


class _Engine:
    """Requests are ids; ``step`` finishes the first one left; ``abort`` ends one."""

    def __init__(self) -> None:
        self.states: dict[str, object] = {}
        self.finished: list = []
        self.added: list[tuple] = []
        self.steps = 0

    def add_request(
        self, prompt, params, request_id, prompt_ids, detokenize, arrival, priority, lora
    ) -> None:
        if prompt == "bad":
            raise RequestError("refused")
        self.added.append(
            (prompt, params, request_id, prompt_ids, detokenize, arrival, priority, lora)
        )
        self.states[request_id] = SimpleNamespace(request_id=request_id)

    def _finish(self, rid: str) -> StreamOutput:
        state = self.states.pop(rid)
        state.final_output = lambda: RequestOutput(rid, None, [1], [], True)
        self.finished.append(state)
        return _update(rid, 9, finished=True)

    def abort(self, rid: str) -> list:
        return [self._finish(rid)] if rid in self.states else []

    def has_unfinished(self) -> bool:
        return bool(self.states)

    def step(self) -> list:
        self.steps += 1
        return [self._finish(next(iter(self.states)))]

    def pop_finished(self) -> list:
        finished, self.finished = self.finished, []
        return finished

    def stats(self) -> dict:
        return {"running": len(self.states)}


def _loop(timings: bool = False) -> tuple[ServingLoop, _Engine, list]:
    engine, emitted = _Engine(), []
    return ServingLoop(engine, emitted.append, timings), engine, emitted


def _add(rid: str, route: int, prompt: str = "p") -> tuple:
    return ("add", rid, route, prompt, [1], None, True, 0.0, 0, None)


def _routes(delivery) -> list[tuple]:
    return [(route, type(item).__name__) for route, item in delivery.items]


def test_stop_aborts_every_request_and_delivers_their_ends() -> None:
    loop, engine, emitted = _loop()
    assert loop.handle(_add("a", 10)) and loop.handle(_add("b", 11))
    assert loop.handle(("stop",)) is False
    assert engine.steps == 0 and not engine.states
    (delivery,) = emitted
    assert _routes(delivery) == [
        (10, "StreamOutput"),
        (11, "StreamOutput"),
        (10, "RequestOutput"),
        (11, "RequestOutput"),
    ]
    assert loop.routes == {}


def test_abort_delivers_the_end_to_the_route_that_added_it() -> None:
    loop, _, emitted = _loop()
    loop.handle(_add("a", 10))
    assert loop.handle(("abort", "a")) is True
    assert [_routes(d) for d in emitted] == [[(10, "StreamOutput"), (10, "RequestOutput")]]
    loop.handle(("abort", "a"))  # (an ended one: an empty delivery, its stats)
    assert emitted[-1].items == [] and emitted[-1].stats == {"running": 0}


def test_a_pickled_request_is_loaded_and_one_that_fails_to_load_fails_alone() -> None:
    loop, engine, emitted = _loop()
    request = ["p", [1, 2], "params", False, 3.5, -2, None]
    assert loop.handle(("add", "a", 7, pickle.dumps(request)))
    assert engine.added == [("p", "params", "a", [1, 2], False, 3.5, -2, None)]
    assert loop.handle(("add", "b", 8, b"not a pickle"))
    (delivery,) = emitted
    ((route, error),) = delivery.items
    assert route == 8 and isinstance(error, RequestError)
    assert str(error).startswith("the engine process could not load this request: ")
    assert delivery.stats == {"running": 1}
    assert loop.routes == {"a": 7}


def test_a_refused_request_is_its_routes_alone_with_the_stats() -> None:
    loop, _, emitted = _loop()
    loop.handle(_add("a", 1))
    loop.handle(_add("b", 2, prompt="bad"))
    ((route, error),) = emitted[0].items
    assert (route, str(error)) == (2, "refused")
    assert emitted[0].stats == {"running": 1} and loop.routes == {"a": 1}


def test_run_applies_every_waiting_command_before_the_next_step() -> None:
    loop, engine, emitted = _loop()
    commands = [_add("a", 1), _add("b", 2), None, ("stop",)]
    seen = []

    def receive(block: bool):
        seen.append(block)
        return commands.pop(0)

    loop.run(receive)
    # (idle: waits for one; then takes what waits without blocking; a step; then idle again)
    assert seen == [True, False, False, False]
    assert engine.steps == 1 and [_routes(d)[-1] for d in emitted] == [
        (1, "RequestOutput"),
        (2, "RequestOutput"),
    ]


def test_timings_cover_every_finished_request_even_one_without_a_route(monkeypatch) -> None:
    from vllm_runner.engine import serving_loop

    monkeypatch.setattr(serving_loop, "request_timings", lambda state: state.request_id)
    loop, engine, emitted = _loop(timings=True)
    loop.handle(_add("a", 1))
    engine.states["gone"] = SimpleNamespace(request_id="gone")  # (added without a route)
    loop.handle(("abort", "gone"))
    loop.handle(("abort", "a"))
    assert [d.timings for d in emitted] == [[(None, "gone")], [(1, "a")]]
    assert [_routes(d) for d in emitted] == [[], [(1, "StreamOutput"), (1, "RequestOutput")]]
    plain, _, untimed = _loop(timings=False)
    plain.handle(_add("a", 1))
    plain.handle(("abort", "a"))
    assert untimed[0].timings == []


def test_a_packed_update_is_whole_again_after_unpack() -> None:
    first = StreamOutput("r", 1, "He", "He", 1, [5], [{5: -0.5}], False, None, [1, 2])
    last = StreamOutput("r", 1, "llo", "Hello", 2, [6], None, True, "stop", [1, 2], "\n", None)
    last.prompt_logprobs, last.prompt_ranks = [None, {2: -1.0}], [None, 3]
    texts: dict[int, str] = {}
    assert unpack(pack(first), "r", [1, 2], texts) == first
    assert unpack(pack(last), "r", [1, 2], texts) == last
    assert texts == {1: "Hello"}
    final = RequestOutput("r", None, [1], [], True)
    assert pack(final) is final


class _Detokenizer:
    def __init__(self, text: str = "") -> None:
        self.calls: list = []
        self.text = text

    def add_tokens(self, ids, stop_terminated) -> None:
        self.calls.append(("add", ids, stop_terminated))

    def take_delta(self, finished) -> str:
        self.calls.append(("take", finished))
        return "<delta>"


@pytest.mark.parametrize(("reason", "finished"), [(None, False), ("stop", True), ("length", True)])
def test_with_text_feeds_the_completions_own_detokenizer(reason, finished) -> None:
    detokenizers = [_Detokenizer(), _Detokenizer()]
    packed = (1, "", 3, [7, 8], None, finished, reason, None, None, None)
    assert with_text(packed, detokenizers) == (1, "<delta>", *packed[2:])
    assert detokenizers[0].calls == []
    assert detokenizers[1].calls == [("add", [7, 8], reason == "stop"), ("take", finished)]


def test_a_stream_route_builds_the_text_here_for_updates_and_the_final_output() -> None:
    route = StreamRoute(None, None, "r", [1], [_Detokenizer("whole text")])
    update = route.whole((0, "", 1, [7], None, False, None, None, None, None))
    assert (update.request_id, update.delta, update.text) == ("r", "<delta>", "<delta>")
    final = RequestOutput("r", None, [1], [CompletionOutput(0, "", [7])], True)
    assert route.whole(final).outputs[0].text == "whole text"
    engine_built = StreamRoute(None, None, "r", [1])  # (texts the engine built: kept)
    update = engine_built.whole((0, "Hi", 1, [7], None, False, None, None, None, None))
    assert update.text == "Hi"
    final = RequestOutput("r", None, [1], [CompletionOutput(0, "Hi", [7])], True)
    assert engine_built.whole(final).outputs[0].text == "Hi"


def test_text_builders_are_one_per_completion_with_the_requests_options() -> None:
    params = SamplingParams(n=3, include_stop_str_in_output=True, skip_special_tokens=False)
    builders = text_builders(None, [1, 2], params)
    assert len(builders) == 3 and len({id(b) for b in builders}) == 3
    assert [(b.include_stop, b.skip_special, b.stop) for b in builders] == [(True, False, [])] * 3


def test_an_exception_that_would_not_load_crosses_the_pipe_as_text() -> None:
    class Needs(Exception):
        def __init__(self, a, b) -> None:
            super().__init__(f"{a}{b}")

    crossed = picklable(Needs("x", "y"))
    assert type(crossed) is RuntimeError and str(crossed) == "Needs: xy"
    intact = ValueError("v")
    assert picklable(intact) is intact
    assert is_final(intact) and is_final(RequestOutput("r", None, [], [], True))
    assert not is_final(_update("r", 1)) and not is_final((0, "", 1))
