"""The pieces between an AsyncLLM and its engine, without an engine: the errors it names, its
loop threads' guard and stop, the client's command and result ends, the outbox, and where a
shared engine is found."""

import asyncio
import contextlib
import dataclasses
import fcntl
import gc
import os
import pickle
import queue
import threading
from multiprocessing import Pipe
from multiprocessing.connection import Listener

import pytest

from vllm_runner.engine import loop_threads
from vllm_runner.engine.engine_client import EngineClient, EngineFailed
from vllm_runner.engine.engine_process import HeldLock, SharedEngine
from vllm_runner.engine.errors import ContextLengthError, failure_cause
from vllm_runner.engine.outbox import Outbox
from vllm_runner.engine.serving_loop import Delivery


def _raise_inner() -> None:
    raise ValueError("bad value")


def _raise_outer() -> None:
    _raise_inner()


def test_a_failure_is_named_by_its_type_message_and_innermost_frame() -> None:
    with pytest.raises(ValueError) as raised:
        _raise_outer()
    line = _raise_inner.__code__.co_firstlineno + 1
    assert failure_cause(raised.value) == (
        f"ValueError: bad value (raised in _raise_inner, test_engine_link.py:{line})"
    )
    assert failure_cause(RuntimeError()) == "RuntimeError"  # (no message, never raised)
    assert failure_cause(RuntimeError("")) == "RuntimeError"  # (an empty message: none)
    assert failure_cause(KeyError("k")) == "KeyError: 'k'"


def test_a_context_length_error_crosses_the_pipe_whole() -> None:
    error = pickle.loads(pickle.dumps(ContextLengthError("too long: 9 > 8", 8)))
    assert type(error) is ContextLengthError
    assert (str(error), error.max_model_len) == ("too long: 9 > 8", 8)


class _Front:
    def __init__(self, running: bool) -> None:
        self._running = running
        self.stopped: list = []

    def _loop_stopped(self, reason) -> None:
        self.stopped.append(reason)


def test_the_guard_runs_the_loop_only_while_its_front_end_runs() -> None:
    ran: list = []
    shut = _Front(running=False)
    loop_threads.FrontEndRef(shut).guarded(lambda: ran.append(1), lambda exc: "never")
    assert ran == [] and shut.stopped == [None]
    running = _Front(running=True)
    ref = loop_threads.FrontEndRef(running)
    ref.guarded(lambda: _raise_inner(), lambda exc: f"why: {exc}")
    assert running.stopped == ["why: bad value"]
    ref.guarded(lambda: ran.append(1), lambda exc: "never")  # (stopped as told)
    assert ran == [1] and running.stopped[-1] is None
    assert loop_threads._loop_failed(RuntimeError()) == "the engine loop failed: RuntimeError"


def test_an_engine_that_fails_to_build_raises_in_the_caller() -> None:
    def build():
        raise MemoryError("no room")

    with pytest.raises(MemoryError, match="no room"):
        loop_threads.start_loop_thread(_Front(True), build, threading.Event(), False)


def test_the_stop_is_sent_once_when_collected_and_not_at_exit() -> None:
    sent: list = []
    front = _Front(running=True)
    stop = loop_threads.stop_when_collected(front, sent.append)
    assert stop.atexit is False
    del front
    gc.collect()
    stop()
    assert sent == [("stop",)]

    def gone(command) -> None:
        raise BrokenPipeError

    front = _Front(running=True)
    loop_threads.stop_when_collected(front, gone)()  # (the process has gone: quiet)


class _Client:
    def __init__(self) -> None:
        self.joined = 0

    def read(self, deliver) -> None:
        pass

    def stopped_because(self, exc) -> str:
        return "never"

    def join(self) -> None:
        self.joined += 1


@pytest.mark.parametrize("dropped", [True, False])
def test_the_reader_waits_for_the_engine_of_a_dropped_front_end_only(dropped) -> None:
    front, client, go = _Front(running=True), _Client(), threading.Event()
    reader = loop_threads.start_reader_thread(front, client, go)
    if dropped:
        del front
        gc.collect()
    go.set()
    reader.join(10)
    assert not reader.is_alive() and client.joined == (1 if dropped else 0)
    if not dropped:
        assert front.stopped == [None]


def test_a_stopped_engine_is_awaitable_at_once() -> None:
    stopped = loop_threads.StoppedEngine()
    with pytest.raises(StopIteration):
        stopped.send(None)
    assert asyncio.run(loop_threads.StoppedEngine()) is None


def _commands(client: EngineClient) -> list:
    got = []
    while True:
        try:
            data = client._outbox.get_nowait()
        except queue.Empty:
            return got
        got.append(data if data is None else pickle.loads(data))


def test_a_request_is_sent_as_bytes_of_its_own_and_nothing_follows_a_stop() -> None:
    client = EngineClient()
    client.send(("add", "r", 3, "prompt", [1, 2], None, True, 0.5, 4))
    client.send(("abort", "r"))
    client.send(("stop",))
    add, abort, stop, end = _commands(client)
    assert add[:3] == ("add", "r", 3) and len(add) == 4
    assert pickle.loads(add[3]) == ["prompt", [1, 2], None, True, 0.5, 4]
    assert (abort, stop, end) == (("abort", "r"), ("stop",), None)


def test_the_reader_hands_on_deliveries_until_the_end_or_the_reason() -> None:
    results_r, results_w = Pipe(duplex=False)
    client = EngineClient()
    client._connections = (None, results_r)
    results_w.send(Delivery([], {"a": 1}))
    results_w.send(None)
    got: list = []
    client.read(got.append)
    assert [d.stats for d in got] == [{"a": 1}] and _commands(client) == [None]
    results_w.send("the engine process failed: X")
    with pytest.raises(EngineFailed) as failed:
        client.read(got.append)
    assert client.stopped_because(failed.value) == "the engine process failed: X"
    assert len(got) == 1


def test_a_shared_engine_is_not_waited_for_by_its_starter() -> None:
    joined: list = []
    client = EngineClient()
    client.process = type("P", (), {"join": lambda self, timeout=None: joined.append(1)})()
    client.shared = True
    client.join()
    assert joined == []
    client.shared = False
    client.join()
    assert joined == [1]


def test_the_outbox_counts_its_backlog_and_keeps_the_last_stats_sent() -> None:
    reader, writer = Pipe(duplex=False)
    outbox = Outbox(writer, "test-outbox")
    started = outbox.sent_at
    outbox.put(Delivery([], {"n": 1}))
    outbox.put(("no stats",))
    assert reader.recv().stats == {"n": 1} and reader.recv() == ("no stats",)
    outbox.close()
    outbox.join(10)
    assert outbox.backlog == 0 and not outbox.sending
    assert outbox.stats_sent == {"n": 1} and outbox.sent_at > started
    with pytest.raises(EOFError):
        reader.recv()


def test_an_unpicklable_result_ends_the_outbox_with_the_reason() -> None:
    reader, writer = Pipe(duplex=False)
    outbox = Outbox(writer, "test-outbox")
    outbox.put(lambda: 0)
    outbox.join(10)
    assert outbox.unsendable and outbox.backlog == 0
    assert reader.recv().startswith("the engine process failed to send this front end's")
    with pytest.raises(EOFError):
        reader.recv()


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path))
    return tmp_path / f"vllm-runner-{os.getuid()}"


@dataclasses.dataclass(frozen=True)
class _Args:
    model: str
    generation_config: str = "auto"


def test_a_shared_engine_is_found_by_folder_not_by_name(home, tmp_path, monkeypatch) -> None:
    for d in ("one/m", "two/m", "one/vllm", "two/vllm"):
        (tmp_path / d).mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "one")
    here, dotted = SharedEngine.named("x", _Args("m")), SharedEngine.named("x", _Args("./m"))
    named_config = SharedEngine.named("x", _Args("hub/model", "vllm"))
    monkeypatch.chdir(tmp_path / "two")
    assert here == dotted and SharedEngine.named("x", _Args("m")) != here
    # ("vllm" is the name of a choice, not a folder, wherever it runs)
    assert SharedEngine.named("x", _Args("hub/model", "vllm")) == named_config
    assert SharedEngine.named("y", _Args("hub/model", "vllm")) != named_config
    assert here.socket.startswith(str(home)) and (home.stat().st_mode & 0o777) == 0o700


def test_a_shared_engines_home_others_can_open_is_refused(home) -> None:
    home.mkdir(mode=0o755)
    os.chmod(home, 0o755)
    with pytest.raises(PermissionError, match="must be a directory of this user's only"):
        SharedEngine.named("x", _Args("hub/model"))


def test_the_lock_holder_forgets_its_key_and_a_held_lock_is_released_once(home) -> None:
    place = SharedEngine.named("x", _Args("hub/model"))
    key = place.new_key()
    with place.locked():
        place.forget_key(key, locked=True)
        assert not place.key.exists()
    held = HeldLock(os.open(place.lock, os.O_RDONLY))
    fcntl.flock(held.fd, fcntl.LOCK_EX)
    held.release()
    other = os.open(os.devnull, os.O_RDONLY)  # (may take the number just closed)
    try:
        held.release()  # (closes nothing: not another file's number)
        os.fstat(other)
    finally:
        os.close(other)
    assert held.fd is None
    with open(place.lock) as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (free)


def test_a_socket_of_another_key_is_no_engine(home) -> None:
    place = SharedEngine.named("x", _Args("hub/model"))
    place.new_key()
    listener = Listener(place.socket, "AF_UNIX", authkey=b"another engine's key")

    def accept() -> None:
        with contextlib.suppress(Exception):  # (it refuses the key)
            listener.accept()

    threading.Thread(target=accept, daemon=True).start()
    try:
        assert place.connect(timeout=20) is None
    finally:
        listener.close()
    assert place.connect(timeout=20) is None  # (no socket left: none runs)


def test_an_abandoned_outbox_sends_nothing_more() -> None:
    reader, writer = Pipe(duplex=False)
    outbox = Outbox(writer, "test-outbox")
    outbox.put(b"x" * (1 << 20))  # (larger than the pipe: its sender waits for the reader)
    assert reader.poll(10)  # (sending)
    outbox.put(("queued",))
    outbox.abandon()
    assert len(reader.recv()) == 1 << 20
    outbox.join(10)
    with pytest.raises(EOFError):
        reader.recv()
    outbox.put(("later",))
    assert outbox.backlog == 1  # (after the close: counted, never sent)


def test_a_blocked_send_to_a_socket_ends_when_abandoned() -> None:
    reader, writer = Pipe(duplex=True)  # (a socket pair)
    outbox = Outbox(writer, "test-outbox")
    outbox.put(b"x" * (16 << 20))  # (nobody reads: its send blocks)
    assert reader.poll(10)  # (sending)
    outbox.abandon()
    outbox.join(10)
    assert not outbox.sending and outbox.failed
    reader.close()


def test_a_failed_outbox_counts_what_it_drops() -> None:
    reader, writer = Pipe(duplex=False)
    outbox = Outbox(writer, "test-outbox")
    reader.close()
    outbox.put(("lost",))
    for _ in range(1000):
        if outbox.failed and outbox.backlog == 0:
            break
        threading.Event().wait(0.01)
    outbox.put(("dropped",))
    outbox.close()
    outbox.join(10)
    assert outbox.failed and outbox.backlog == 0
