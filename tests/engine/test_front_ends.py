"""FrontEnds, the engine process's side of a shared engine, without an engine."""

import os
import subprocess
import sys
import threading
import time
from multiprocessing import Pipe
from multiprocessing.connection import Client, Connection, Listener

import pytest

from vllm_runner.engine import front_ends as module
from vllm_runner.engine.engine_client import EngineClient
from vllm_runner.engine.front_ends import STATS_INTERVAL_S, FrontEnds
from vllm_runner.engine.outbox import Outbox
from vllm_runner.engine.serving_loop import Delivery

HELLO = ("ready", None, {"generation_tokens_total": 0}, "m", os.getpid())


def _engine_side(tmp_path=None, hello: tuple = HELLO):
    """FrontEnds with its first front end's pipes, listening when ``tmp_path`` is given:
    (front_ends, the first's command writer, its results reader, connect), where connect()
    gives a connected front end that has its hello."""
    commands_r, commands_w = Pipe(duplex=False)
    results_r, results_w = Pipe(duplex=False)
    address, key = str(tmp_path / "s") if tmp_path else "", os.urandom(32)
    listener = Listener(address, "AF_UNIX", authkey=key) if tmp_path else None
    front_ends = FrontEnds(commands_r, results_w, hello, listener)

    def connect() -> Connection:
        conn = Client(address, "AF_UNIX", authkey=key)
        assert conn.poll(30) and conn.recv()[0] == "ready"
        return conn

    return front_ends, commands_w, results_r, connect


def _until(front_ends, done) -> list:
    got, deadline = [], time.monotonic() + 30
    while not done():
        assert time.monotonic() < deadline
        got += filter(None, [front_ends.receive(False)])
        time.sleep(0.005)
    return got


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


def test_an_engine_whose_socket_file_was_removed_still_ends_cleanly(tmp_path):
    """Something else removed the live engine's socket file (a tmp cleaner): its last
    front end leaving still ends it with the stop and a farewell, not FileNotFoundError."""
    front_ends, commands_w, results_r, _ = _engine_side(tmp_path)
    os.unlink(tmp_path / "s")
    commands_w.send(("stop",))
    assert front_ends.receive(True) == ("stop",)
    assert results_r.recv() is None


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
    front_ends, commands_w, results_r, connect = _engine_side(tmp_path)

    def until(done) -> None:
        assert _until(front_ends, done) == []

    def recv(conn):
        assert conn.poll(30)
        return conn.recv()

    second = connect()
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
    monkeypatch.setattr(module, "MAX_BACKLOG", 4)
    monkeypatch.setattr(module, "STALL_S", 0.0)
    hello = ("ready", None, {"kv_blocks_total": 7}, "m", os.getpid())
    front_ends, commands_w, results_r, connect = _engine_side(tmp_path, hello)
    stalled = connect()
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

    client = EngineClient()
    client.pid = os.getpid()  # (a live process)
    assert "dropped this front end" in client.stopped_because(EOFError())
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    client.pid = gone.pid
    assert client.stopped_because(EOFError()) == f"the engine process (pid {gone.pid}) exited"


def test_the_only_front_end_is_not_dropped(monkeypatch):
    """A front end that falls behind (busy, paused in a debugger) while it is the only one
    holds back no one else; dropping it would end the engine (found in review)."""
    monkeypatch.setattr(module, "MAX_BACKLOG", 4)
    monkeypatch.setattr(module, "STALL_S", 0.0)
    front_ends, commands_w, results_r, _ = _engine_side()
    commands_w.send(("ready", False))
    commands_w.send(("add", "r", 5, "prompt", [1, 2], None))
    _until(front_ends, lambda: front_ends.front_ends[0].reading and front_ends.front_ends[0].live)
    big = {"generation_tokens_total": 0, "pad": b"x" * (1 << 20)}  # (fills the pipe)

    def steps() -> None:
        for _ in range(12):
            front_ends.emit(Delivery([], big))
            time.sleep(STATS_INTERVAL_S)

    loop = threading.Thread(target=steps, daemon=True)
    loop.start()
    time.sleep(1.0)  # the front end reads nothing for a second
    received = []

    def read() -> None:
        while len(received) < 12 and results_r.poll(10):
            try:
                received.append(results_r.recv())
            except EOFError:
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    loop.join(30)
    reader.join(30)
    assert 0 in front_ends.front_ends, "its only front end dropped: the engine ends"
    assert ("abort", "0:r") not in front_ends.pending
    assert len(received) == 12


def test_an_engine_still_exiting_is_not_said_to_have_dropped_this_front_end():
    """EOF comes when the engine's sockets close, which in its exit comes before it is a
    zombie (the kernel releases its files, the GPU driver's among them, first): a front
    end that looked at once found it 'alive' and blamed itself (found in review)."""
    exiting = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"])
    client = EngineClient()
    client.pid = exiting.pid
    try:
        reason = client.stopped_because(EOFError())
    finally:
        exiting.wait()
    assert "dropped" not in reason, reason


def test_a_front_end_slow_but_reading_is_not_dropped(tmp_path, monkeypatch):
    """Far behind but still taking its results (a busy process): kept, and sent every
    one; only one that has taken nothing for STALL_S goes."""
    monkeypatch.setattr(module, "MAX_BACKLOG", 2)
    front_ends, commands_w, results_r, connect = _engine_side(tmp_path)
    slow = connect()
    slow.send(("ready", False))
    commands_w.send(("ready", False))
    _until(
        front_ends,
        lambda: (
            all(f.reading for f in front_ends.front_ends.values()) and 1 in front_ends.front_ends
        ),
    )
    got: dict[str, list] = {"slow": [], "first": []}

    def read(conn, into: list, pause: float) -> None:
        while conn.poll(30) and (item := conn.recv()) is not None:
            into.append(item)
            time.sleep(pause)

    readers = [
        threading.Thread(target=read, args=(slow, got["slow"], 0.2)),
        threading.Thread(target=read, args=(results_r, got["first"], 0.0)),
    ]
    for r in readers:
        r.start()
    pad, backlog = b"x" * (1 << 20), 0
    for n in range(12):
        front_ends.emit(Delivery([], {"generation_tokens_total": n, "pad": pad}))
        backlog = max(backlog, front_ends.front_ends[1].results.backlog)
        time.sleep(STATS_INTERVAL_S)
    assert backlog >= module.MAX_BACKLOG  # (it was behind)
    assert 1 in front_ends.front_ends, "a front end that reads, slowly, was dropped"
    slow.send(("stop",))
    commands_w.send(("stop",))
    while front_ends.receive(False) != ("stop",):
        pass
    for r in readers:
        r.join(30)
    assert len(got["slow"]) == len(got["first"]) == 12


def test_a_result_that_fails_to_pickle_does_not_leave_its_front_end_waiting_forever():
    """A result that does not pickle marks the front end unsendable, sends it why and
    closes its connection (found in review: the sender thread died silently)."""
    results_r, results_w = Pipe(duplex=False)
    box = Outbox(results_w, "test-send")
    box.put(Delivery([], {"bad": lambda: 0}))  # (not picklable)
    box.put(None)
    box.close()
    box.join(5)
    assert box.unsendable, "the loop never learns that this front end's results stopped"
    assert results_r.poll(5), "the front end waits for ever"
    assert "failed to send this front end's results" in results_r.recv()
    assert results_r.poll(5)
    with pytest.raises(EOFError):
        results_r.recv()


def test_the_engine_ends_when_its_last_front_end_is_dropped_in_the_idle_flush():
    """receive(block=True) flushes stats before waiting; a front end dropped there (its
    sends failed) must end the engine if it was the last (found in review: the loop then
    waited on its wake pipe alone, for ever)."""
    front_ends, commands_w, results_r, _ = _engine_side()
    commands_w.send(("ready", False))
    _until(front_ends, lambda: front_ends.front_ends[0].reading)
    results_r.close()  # its process dies during the engine's last step
    front_ends.emit(Delivery([], {"generation_tokens_total": 1}))  # (its send fails)
    front_ends.emit(Delivery([], {"generation_tokens_total": 2}))  # (skipped: stale)
    deadline = time.monotonic() + 10
    while not front_ends.front_ends[0].results.failed:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    commands_w.close()
    got = []
    idle = threading.Thread(target=lambda: got.append(front_ends.receive(True)), daemon=True)
    idle.start()
    idle.join(10)
    assert got == [("stop",)], "the engine process never ends"


def test_a_dropped_publisher_hands_over_what_it_was_sent(tmp_path, monkeypatch):
    """The new publisher counts on from the stats its predecessor last received, not last
    queued: those queued for a dropped (stalled) one never reach it (found in review)."""
    monkeypatch.setattr(module, "MAX_BACKLOG", 4)
    monkeypatch.setattr(module, "STALL_S", 0.0)
    front_ends, commands_w, results_r, connect = _engine_side(tmp_path)
    stalled = connect()
    stalled.send(("ready", True))  # the publisher
    _until(front_ends, lambda: 1 in front_ends.front_ends and front_ends.front_ends[1].reading)
    front_ends.emit(Delivery([], {"generation_tokens_total": 0}))  # (it gets this one whole)
    commands_w.send(("ready", True))
    _until(front_ends, lambda: front_ends.front_ends[0].reading)
    received = []
    reader = threading.Thread(target=lambda: received.extend(iter(results_r.recv, None)))
    reader.start()
    pad = b"x" * (1 << 20)  # (the first fills the stalled one's socket: none arrives whole)
    n = 0
    while 1 in front_ends.front_ends:
        n += 1
        front_ends.emit(Delivery([], {"generation_tokens_total": 100 * n, "pad": pad}))
        time.sleep(STATS_INTERVAL_S)
    time.sleep(STATS_INTERVAL_S)
    front_ends.emit(Delivery([], {"generation_tokens_total": 100 * (n + 1), "pad": pad}))
    commands_w.send(("stop",))
    while front_ends.receive(False) != ("stop",):
        pass
    reader.join(30)
    handover = [d for d in received if not d.publish_stats][-1]
    assert handover.stats["generation_tokens_total"] == 0, (
        f"counts from {handover.stats['generation_tokens_total']}: the tokens of the "
        "results the stalled publisher never got are counted by no one"
    )
    stalled.close()


def test_a_new_publisher_publishes_while_the_engine_idles(tmp_path):
    """The publisher leaves (a worker restarted) while the engine idles: the next one
    publishes the stats at once, not at the next request (/metrics showed no KV blocks:
    the old one's gauges are gone with it, the new one's were never set)."""
    front_ends, commands_w, results_r, connect = _engine_side(tmp_path)
    publisher = connect()
    publisher.send(("ready", True))
    _until(front_ends, lambda: 1 in front_ends.front_ends and front_ends.front_ends[1].reading)
    idle = {"kv_blocks_total": 7, "generation_tokens_total": 3}
    front_ends.emit(Delivery([], idle))
    commands_w.send(("ready", True))
    _until(front_ends, lambda: front_ends.front_ends[0].reading)
    time.sleep(STATS_INTERVAL_S)
    front_ends.emit(Delivery([], idle))  # the engine's last step: everyone has its stats
    assert results_r.poll(30) and not results_r.recv().publish_stats
    publisher.send(("stop",))
    _until(front_ends, lambda: 1 not in front_ends.front_ends)
    got = []
    waiting = threading.Thread(target=lambda: got.append(front_ends.receive(True)), daemon=True)
    waiting.start()  # the engine idles: it flushes stats, then waits for a command
    published = None
    while published is None and results_r.poll(10):
        delivery = results_r.recv()
        published = delivery if delivery.publish_stats else None
    assert published is not None, "nobody publishes the idle engine's stats"
    assert published.stats == idle
    commands_w.send(("stop",))
    waiting.join(30)
    assert got == [("stop",)]
    publisher.close()
