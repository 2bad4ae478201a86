"""FrontEnds, the engine process's side of a shared engine, without an engine."""

import os
from multiprocessing import Pipe
from multiprocessing.connection import Client, Listener

from vllm_runner.engine.front_ends import STATS_INTERVAL_S, FrontEnds


def test_no_front_end_gets_a_hello_once_the_engine_is_ending(tmp_path):
    address, key = str(tmp_path / "s"), os.urandom(32)
    commands_r, commands_w = Pipe(duplex=False)
    results_r, results_w = Pipe(duplex=False)
    listener = Listener(address, "AF_UNIX", authkey=key)
    hello = ("ready", None, {"generation_tokens_total": 0}, "m", os.getpid())
    front_ends = FrontEnds(commands_r, results_w, hello, listener)
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


def test_a_key_file_goes_only_when_nobody_holds_the_lock(tmp_path, monkeypatch):
    """An ending engine removes its key file, but not while another process holds the lock
    (it may be writing a new engine's key into that file)."""
    import fcntl

    from vllm_runner.engine.engine_process import SharedEngine

    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path))
    place = SharedEngine.named("x", "args")
    key = place.new_key()
    with open(place.lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        # (a lock on another open file of the lock's: as another process's would be)
        place.forget_key(key)
        assert place.key.read_bytes() == key
    place.forget_key(b"another engine's")
    assert place.key.exists()
    place.forget_key(key)
    assert not place.key.exists()


def test_the_publisher_stays_until_it_leaves(tmp_path):
    """The first front end that says it publishes keeps publishing when an older one says
    so later: its gauges stay set in its process, and /metrics sums gauges over the live
    workers (CI caught kv_blocks_total counted twice when the role moved at start-up)."""
    import time

    from vllm_runner.engine.serving_loop import Delivery

    address, key = str(tmp_path / "s"), os.urandom(32)
    commands_r, commands_w = Pipe(duplex=False)
    results_r, results_w = Pipe(duplex=False)
    listener = Listener(address, "AF_UNIX", authkey=key)
    hello = ("ready", None, {"kv_blocks_total": 7}, "m", os.getpid())
    front_ends = FrontEnds(commands_r, results_w, hello, listener)

    def until(done) -> None:
        deadline = time.monotonic() + 30
        while not done():
            assert time.monotonic() < deadline
            assert front_ends.receive(False) is None
            time.sleep(0.01)

    def recv(conn):
        assert conn.poll(30)
        return conn.recv()

    second = Client(address, "AF_UNIX", authkey=key)
    recv(second)  # (its hello)
    second.send(("ready", True))  # the one that connected is ready first
    until(lambda: 1 in front_ends.front_ends and front_ends.front_ends[1].reading)
    step = Delivery([], {"kv_blocks_total": 7})
    front_ends.emit(step)
    assert not recv(second).publish_stats  # (the unpublished hand-over of the totals)
    assert recv(second).publish_stats
    commands_w.send(("ready", True))  # the older one is ready now
    until(lambda: front_ends.front_ends[0].reading)
    for _ in range(2):
        time.sleep(STATS_INTERVAL_S)  # (stats alone go out at most once an interval)
        front_ends.emit(step)
        assert (recv(results_r).publish_stats, recv(second).publish_stats) == (False, True)
    second.send(("stop",))
    until(lambda: 1 not in front_ends.front_ends)
    assert recv(second) is None
    # it left: the oldest left takes over, after the unpublished hand-over of the totals
    time.sleep(STATS_INTERVAL_S)
    front_ends.emit(step)
    assert not recv(results_r).publish_stats
    assert recv(results_r).publish_stats


def test_a_front_end_that_reads_nothing_holds_back_no_one(tmp_path, monkeypatch):
    """A front end whose process lives but reads nothing (e.g. stopped) fills its socket:
    the engine's loop still emits to the others, and drops it once it is MAX_BACKLOG
    results behind, its requests aborted (a blocking send held the engine back for all)."""
    import threading
    import time

    from vllm_runner.engine import front_ends as module
    from vllm_runner.engine.serving_loop import Delivery

    monkeypatch.setattr(module, "MAX_BACKLOG", 4)
    address, key = str(tmp_path / "s"), os.urandom(32)
    commands_r, commands_w = Pipe(duplex=False)
    results_r, results_w = Pipe(duplex=False)
    hello = ("ready", None, {"kv_blocks_total": 7}, "m", os.getpid())
    front_ends = FrontEnds(commands_r, results_w, hello, Listener(address, "AF_UNIX", authkey=key))
    stalled = Client(address, "AF_UNIX", authkey=key)
    assert stalled.poll(30) and stalled.recv()[0] == "ready"
    stalled.send(("ready", False))
    stalled.send(("add", "r", 5, "prompt", [1, 2], None))
    commands_w.send(("ready", False))
    deadline, commands = time.monotonic() + 30, []
    while not (commands and front_ends.front_ends[0].reading):
        assert time.monotonic() < deadline
        commands += filter(None, [front_ends.receive(False)])
    assert [c[:3] for c in commands] == [("add", "1:r", (1, 5))]
    received = []
    reader = threading.Thread(target=lambda: received.extend(iter(results_r.recv, None)))
    reader.start()
    big = {"kv_blocks_total": 7, "pad": b"x" * (1 << 20)}  # (a few fill a socket's buffer)

    def steps() -> None:
        for _ in range(12):
            front_ends.emit(Delivery([], big))
            time.sleep(STATS_INTERVAL_S)  # (stats alone go out at most once an interval)

    loop = threading.Thread(target=steps, daemon=True)
    loop.start()
    loop.join(60)
    assert not loop.is_alive(), "the engine's loop is blocked by a front end reading nothing"
    assert 1 not in front_ends.front_ends  # dropped
    assert ("abort", "1:r") in front_ends.pending
    commands_w.send(("stop",))
    while front_ends.receive(False) != ("stop",):
        pass
    reader.join(30)
    assert len(received) == 12  # the one that reads got every step
    stalled.close()


def test_a_dropped_front_end_is_told_why():
    """Its results end while the shared engine lives on: not 'the engine exited'."""
    import subprocess
    import sys

    from vllm_runner.engine.engine_client import EngineClient

    client = EngineClient()
    client.pid = os.getpid()  # (a live process)
    assert "dropped this front end" in client.stopped_because(EOFError())
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    client.pid = gone.pid
    assert client.stopped_because(EOFError()) == f"the engine process (pid {gone.pid}) exited"
