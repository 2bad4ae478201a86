"""EngineClient's start and its reasons for a stop, with a stand-in process (none spawned)."""

import multiprocessing
import os
from types import SimpleNamespace

import pytest

from vllm_runner.engine import engine_client
from vllm_runner.engine.engine_client import EngineClient
from vllm_runner.engine.engine_process import SharedEngine


class _Process:
    """Answers at start as the engine process would (``reply``), through its results pipe."""

    reply: tuple = ("ready", "limits", {"running": 0}, "tiny", 1)
    made: list = []

    def __init__(self, target, args, name, daemon) -> None:
        self.args = args
        self.pid = os.getpid()
        self.exitcode = 1
        self.killed = False
        _Process.made.append(self)

    def start(self) -> None:
        self.args[2].send(self.reply)

    def join(self, timeout=None) -> None:
        pass

    def is_alive(self) -> bool:
        return False

    def kill(self) -> None:
        self.killed = True


@pytest.fixture
def spawn(monkeypatch, tmp_path):
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path))
    ctx = SimpleNamespace(Pipe=multiprocessing.Pipe, Process=_Process)
    monkeypatch.setattr(engine_client.multiprocessing, "get_context", lambda kind: ctx)
    monkeypatch.setattr(_Process, "made", [])
    return _Process


def test_a_shared_engine_times_requests_for_whichever_front_ends_want_it(spawn) -> None:
    alone, shared = EngineClient(), EngineClient()
    assert alone.start("args", False, None) == ("limits", {"running": 0}, "tiny")
    assert shared.start("args", False, "name") == ("limits", {"running": 0}, "tiny")
    # (args: engine args, commands, results, timings, log level, shared)
    assert [p.args[3] for p in spawn.made] == [False, True]
    assert spawn.made[0].args[5] is None and spawn.made[1].args[5][0].socket.endswith(".sock")


def test_a_shared_engine_that_fails_to_start_leaves_no_key_file(spawn, monkeypatch) -> None:
    monkeypatch.setattr(spawn, "reply", ("failed", ValueError("no such model")))
    with pytest.raises(ValueError, match="no such model"):
        EngineClient().start("args", False, "name")
    assert not SharedEngine.named("name", "args").key.exists()


def test_the_reason_names_the_exit_code_of_its_own_engine(spawn) -> None:
    client = EngineClient()
    client.start("args", False, None)
    assert client.stopped_because(EOFError()) == "the engine process exited (code 1)"


def test_a_failed_reader_of_a_shared_engine_leaves_it_running(spawn) -> None:
    client = EngineClient()
    client.start("args", False, "name")
    reason = client.stopped_because(ValueError("bad"))
    assert reason == "reading the engine process's results failed: ValueError('bad')"
    assert not spawn.made[0].killed and all(c.closed for c in client._connections)
    alone = EngineClient()
    alone.start("args", False, None)
    alone.stopped_because(ValueError("bad"))
    assert spawn.made[1].killed


def test_an_engine_that_exits_while_loading_leaves_no_key_file(spawn, monkeypatch) -> None:
    """It died before answering (EOF, no "failed" reply): as a failed start, its key goes."""
    monkeypatch.setattr(spawn, "start", lambda self: None)
    with pytest.raises(RuntimeError, match=r"exited with code 1 while loading"):
        EngineClient().start("args", False, "name")
    assert not SharedEngine.named("name", "args").key.exists()


def test_a_shared_engine_is_not_a_child_that_exit_waits_for(spawn, monkeypatch) -> None:
    """multiprocessing joins its children at exit: a shared engine, which others may still
    use, is not one of them (its starter would wait for the last of them to go)."""
    reply = spawn.start

    def start(self) -> None:
        multiprocessing.process._children.add(self)
        reply(self)

    monkeypatch.setattr(spawn, "start", start)
    own, shared = EngineClient(), EngineClient()
    own.start("args", False, None)
    shared.start("args", False, "name")
    try:
        assert own.process in multiprocessing.process._children
        assert shared.process not in multiprocessing.process._children
    finally:
        multiprocessing.process._children.discard(own.process)


def test_an_engine_that_failed_is_reaped_if_it_is_its_own(spawn, monkeypatch) -> None:
    """Its loop failed (the reason sent): its own engine process is waited for as it exits,
    a shared one is left to its last front end."""
    joined = []
    monkeypatch.setattr(spawn, "join", lambda self, timeout=None: joined.append((self, timeout)))
    own, shared = EngineClient(), EngineClient()
    own.start("args", False, None)
    shared.start("args", False, "name")
    assert own.stopped_because(engine_client.EngineFailed("the loop failed")) == "the loop failed"
    assert shared.stopped_because(engine_client.EngineFailed("x")) == "x"
    # (the reaper thread of the shared one joins it without a timeout)
    assert [j for j in joined if j[1] is not None] == [(own.process, 5)]
