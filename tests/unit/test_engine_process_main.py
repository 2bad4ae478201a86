"""The engine process's main, run here (not spawned) with a stand-in engine: what it tells
its starter, the socket and key file of a shared engine, and how its loop's failure ends it."""

import fcntl
import logging
import os
import signal
from multiprocessing import Pipe
from multiprocessing.connection import Client
from types import SimpleNamespace

import pytest

from vllm_runner.engine import engine_process
from vllm_runner.engine.engine_process import HeldLock, SharedEngine, run_engine_process


class _Engine:
    def __init__(self, args, serving: bool) -> None:
        if args == "fail":
            raise ValueError("no such model")
        self.limits = "limits"
        self.model_config = SimpleNamespace(name="tiny")
        self.states: dict = {}

    def stats(self) -> dict:
        return {"running": 0}

    def has_unfinished(self) -> bool:
        return False

    def abort(self, rid: str) -> list:
        if rid.endswith("boom"):  # (named by its front end: "0:boom")
            raise RuntimeError("abort failed")
        return []

    def pop_finished(self) -> list:
        return []


@pytest.fixture
def main(monkeypatch, tmp_path):
    """run_engine_process here, its signal handlers and log level put back after."""
    monkeypatch.setattr(engine_process, "EngineCore", _Engine)
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path))
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    level = logging.getLogger("vllm_runner").level
    yield
    signal.signal(signal.SIGINT, handlers[0])
    signal.signal(signal.SIGTERM, handlers[1])
    logging.getLogger("vllm_runner").setLevel(level)


def _pipes():
    commands_r, commands_w = Pipe(duplex=False)
    results_r, results_w = Pipe(duplex=False)
    return commands_r, commands_w, results_r, results_w


def test_a_failed_build_is_sent_to_its_starter(main) -> None:
    commands_r, _, results_r, results_w = _pipes()
    run_engine_process("fail", commands_r, results_w, False, logging.INFO)
    kind, error = results_r.recv()
    assert (kind, type(error), str(error)) == ("failed", ValueError, "no such model")


def test_a_shared_engine_replaces_a_dead_ones_socket_and_forgets_its_key(main) -> None:
    place = SharedEngine.named("x", "args")
    key = place.new_key()
    with open(place.socket, "w"):  # (a killed engine's socket file)
        pass
    commands_r, commands_w, results_r, results_w = _pipes()
    commands_w.send(("ready", False))
    commands_w.send(("stop",))
    lock = HeldLock(os.open(place.lock, os.O_RDONLY | os.O_CREAT))
    fcntl.flock(lock.fd, fcntl.LOCK_EX)  # (its starter's, passed on: released once ready)
    run_engine_process("args", commands_r, results_w, False, logging.INFO, (place, key, lock))
    assert results_r.recv() == ("ready", "limits", {"running": 0}, "tiny", os.getpid())
    assert lock.fd is None
    assert not place.key.exists() and not os.path.exists(place.socket)
    with pytest.raises(OSError):
        Client(place.socket, "AF_UNIX", authkey=key)


def test_a_failed_loop_tells_its_front_ends_why_and_raises(main) -> None:
    commands_r, commands_w, results_r, results_w = _pipes()
    commands_w.send(("ready", False))
    commands_w.send(("abort", "boom"))
    with pytest.raises(RuntimeError, match="abort failed"):
        run_engine_process("args", commands_r, results_w, False, logging.INFO)
    assert results_r.recv()[0] == "ready"
    while not isinstance(reason := results_r.recv(), str):  # (its stats before)
        pass
    assert reason.startswith("the engine process failed: RuntimeError: abort failed (raised in ")
    assert reason.endswith(
        f"test_engine_process_main.py:{_Engine.abort.__code__.co_firstlineno + 2})"
    )
