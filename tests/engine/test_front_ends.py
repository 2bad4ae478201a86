"""FrontEnds, the engine process's side of a shared engine, without an engine."""

import os
from multiprocessing import Pipe
from multiprocessing.connection import Client, Listener

from vllm_runner.engine.front_ends import FrontEnd, FrontEnds


def test_no_front_end_gets_a_hello_once_the_engine_is_ending(tmp_path):
    address, key = str(tmp_path / "s"), os.urandom(32)
    commands_r, commands_w = Pipe(duplex=False)
    results_r, results_w = Pipe(duplex=False)
    listener = Listener(address, "AF_UNIX", authkey=key)
    hello = ("ready", None, {"generation_tokens_total": 0}, "m", os.getpid())
    front_ends = FrontEnds(FrontEnd(0, commands_r, results_w), hello, listener)
    commands_w.send(("stop",))
    assert front_ends.receive(True) == ("stop",)  # the last front end left: the engine ends
    assert results_r.recv() is None
    # A worker connecting now (the engine process still winds down) must be refused, so
    # that it starts a new engine, not be told this one is ready.
    try:
        conn = Client(address, "AF_UNIX", authkey=key)
        got = conn.recv() if conn.poll(5) else None
    except (OSError, EOFError):
        got = None
    assert got is None, f"told {got[0]!r} by an engine that is ending"
    assert not os.path.exists(address)  # (the next worker finds no socket: starts an engine)
