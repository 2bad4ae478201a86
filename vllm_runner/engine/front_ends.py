"""The engine process's front ends: the process that started it (over its pipes) and, for a
shared engine, the other processes that connect to its socket (a BentoML server's workers).

Each front end's commands reach the one ServingLoop with its requests renamed
``"<front end>:<request id>"`` and its routes ``(front end, route)``, so that two front ends
may use the same ids; outputs go back to the front end that added the request, with its own
ids. The process ends when its last front end has gone.
"""

import contextlib
import dataclasses
import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from multiprocessing import AuthenticationError, Pipe
from multiprocessing.connection import Connection, Listener, wait

from vllm_runner.engine.outbox import Outbox
from vllm_runner.engine.outputs import FinalOutput
from vllm_runner.engine.serving_loop import Delivery, is_final, pack, picklable

logger = logging.getLogger(__name__)

# A front end with no request in a step gets that step's stats at most this often (and when
# the engine goes idle): every step to every front end would cost each its share of reads.
STATS_INTERVAL_S = 0.05
# A front end this many deliveries behind that has taken none for STALL_S (its process
# alive but reading nothing, e.g. stopped) is dropped and its requests aborted, unless it is
# the only one: its backlog would grow while it holds their KV-cache blocks.
MAX_BACKLOG = 2048
STALL_S = 10.0
SENDERS_EXIT_S = 5.0  # the engine, ending, waits this long for its last results to go out


@dataclasses.dataclass
class FrontEnd:
    number: int
    commands: Connection  # read here
    results: Outbox  # sends its results (over the same connection as commands for a socket)
    live: dict[int, str] = dataclasses.field(default_factory=dict)  # route -> its request id
    leaving: bool = False  # sent stop: goes once its requests' last outputs are sent
    # NOTE: results go only to a front end that said it reads them ("ready", after its own
    # start-up): one still loading its tokenizer would leave them unread.
    reading: bool = False
    publishes: bool = False  # it turns the engine's stats into metrics
    stats_sent_at: float = 0.0
    stats_stale: bool = False


class FrontEnds:
    """``receive`` and ``emit`` of the engine process's ServingLoop, over every front end."""

    def __init__(
        self,
        commands: Connection,
        results: Connection,
        hello: tuple,
        listener: Listener | None,
        on_close: Callable[[], None] = lambda: None,
    ) -> None:
        """The first front end's ``commands`` and ``results`` (the process that started the
        engine); ``on_close``: called once no front end is left and none can join any more."""
        self.front_ends = {0: FrontEnd(0, commands, Outbox(results, "vllm-runner-send-0"))}
        self._senders: list[Outbox] = []  # those of front ends gone, maybe still sending
        self.pending: deque[tuple] = deque()
        self.hello = hello
        self.last_stats: dict = hello[2]
        self._numbers = iter(range(1, 1 << 62))
        self._accepted: deque[Connection] = deque()
        self._wake_read, self._wake_write = Pipe(duplex=False)
        self._listener = listener
        self._on_close = on_close
        # NOTE: the accept thread hands over a connection (its hello sent) under this lock,
        # and the last front end's going closes the listener under it: a process that
        # connects as the engine ends is refused (and starts a new one), never told "ready".
        self._joining = threading.Lock()
        self._closed = False
        self._owner: int | None = None  # the front end that publishes the stats
        self._published: dict = hello[2]  # the stats it was last sent
        if listener is not None:
            threading.Thread(
                target=self._accept, args=(listener,), name="vllm-runner-accept", daemon=True
            ).start()

    # ---- commands in -----------------------------------------------------------------------
    def receive(self, block: bool) -> tuple | None:
        """The next command for the loop; ``("stop",)`` once no front end is left."""
        while not self.pending:
            if not self.front_ends and self._close():
                deadline = time.monotonic() + SENDERS_EXIT_S  # (their last results: farewells)
                for sender in self._senders:
                    sender.join(max(0.0, deadline - time.monotonic()))
                return ("stop",)
            if block:
                self._flush_stats()
                if self.pending or not self.front_ends:  # (it dropped one: maybe the last)
                    continue
            by_conn = {f.commands: f for f in self.front_ends.values()}
            for conn in wait([*by_conn, self._wake_read], timeout=None if block else 0):
                if conn is self._wake_read:
                    self._admit()
                    continue
                front = by_conn[conn]
                try:
                    command = conn.recv()
                except (EOFError, OSError):  # that front end's process is gone
                    self._leave(front)
                except Exception:  # (e.g. one that does not unpickle here): its alone
                    logger.exception("front end %d sent a bad command: dropped", front.number)
                    self._leave(front)
                else:
                    self._command(front, command)
            if not block:
                break
        return self.pending.popleft() if self.pending else None

    def _close(self) -> bool:
        """No front end is left: stop accepting, unless one has just joined (then False)."""
        with self._joining:
            if self._accepted:
                self._admit()
                return False
            if not self._closed:
                self._closed = True
                if self._listener is not None:
                    # (removes the socket's file: missing if something else removed it)
                    with contextlib.suppress(FileNotFoundError):
                        self._listener.close()
                self._on_close()
        return True

    def _command(self, front: FrontEnd, command: tuple) -> None:
        k = front.number
        if command[0] == "add":
            _, request_id, route, *request = command
            front.live[route] = request_id
            renamed = ("add", f"{k}:{request_id}", (k, route), *request)
            self.pending.append(renamed)
        elif command[0] == "abort":
            self.pending.append(("abort", f"{k}:{command[1]}"))
        elif command[0] == "ready":
            front.reading, front.publishes, front.stats_stale = True, command[1], True
        else:  # stop: its requests end (their last outputs sent), then its results end
            front.leaving = True
            self.pending.extend(("abort", f"{k}:{rid}") for rid in set(front.live.values()))
            if not front.live:
                self._farewell(front)

    # ---- results out -----------------------------------------------------------------------
    def emit(self, delivery: Delivery) -> None:
        self.last_stats = delivery.stats
        items: dict[int, list] = defaultdict(list)
        for (k, route), item in delivery.items:
            front = self.front_ends.get(k)
            if front is None:
                continue
            if is_final(item):
                request_id = front.live.pop(route, None)
                if isinstance(item, FinalOutput):
                    item = dataclasses.replace(item, request_id=request_id)
            items[k].append((route, picklable(pack(item))))
        timings: dict[int, list] = defaultdict(list)
        for route, t in delivery.timings:
            if route is not None:
                timings[route[0]].append((route[1], t))
        now = time.monotonic()
        owner = self._current_owner(now)
        for k, front in list(self.front_ends.items()):
            if not front.reading:
                continue
            if k not in items and k not in timings and now - front.stats_sent_at < STATS_INTERVAL_S:
                front.stats_stale = True
                continue
            self._send(front, Delivery(items[k], delivery.stats, timings[k], k == owner), now)
            if front.leaving and not front.live:
                self._farewell(front)

    def _flush_stats(self) -> None:
        """The engine is going idle: front ends that missed the last stats get them."""
        now = time.monotonic()
        owner = self._current_owner(now)
        for k, front in list(self.front_ends.items()):
            if front.reading and front.stats_stale:
                self._send(front, Delivery([], self.last_stats, [], k == owner), now)

    def _current_owner(self, now: float) -> int | None:
        """The first front end that said it publishes metrics publishes the stats until it
        leaves, then the oldest left that does. A new one first gets, unpublished, the stats
        its predecessor last published: it counts on from there, not from what it saw last
        (up to STATS_INTERVAL_S older, or nothing)."""
        # NOTE: never handed to another while the owner stays: the old owner's gauges would
        # stay set in its process and /metrics sums gauges over live workers.
        owner = self._owner
        if owner not in self.front_ends:
            owner = min((k for k, f in self.front_ends.items() if f.publishes), default=None)
        if owner != self._owner and owner is not None:
            handover = Delivery([], self._published, [], False)
            self._send(self.front_ends[owner], handover, now, sent_stats=False)
            # (then the stats published: an idle engine's at the idle flush, not at the next
            # request; the old owner's gauges are gone with it)
            if owner in self.front_ends:
                self.front_ends[owner].stats_stale = True
        self._owner = owner
        return owner

    def _send(
        self, front: FrontEnd, delivery: Delivery, now: float, sent_stats: bool = True
    ) -> None:
        # NOTE: a front end whose reader fails closes its connection (AsyncLLM), and a dead
        # one's closes with it: its sends fail.
        if front.results.failed:
            self._leave(front)
            return
        # NOTE: a front end slow but reading is not dropped (its sends go on), nor the only
        # one (the engine would end with it, and its backlog is bounded by its requests).
        behind = front.results.backlog >= MAX_BACKLOG and len(self.front_ends) > 1
        if behind and now - front.results.sent_at > STALL_S:
            logger.warning(
                "front end %d read nothing for %.0f s, %d results behind: dropped, its %d "
                "requests aborted",
                front.number,
                now - front.results.sent_at,
                front.results.backlog,
                len(set(front.live.values())),
            )
            self._leave(front)
            return
        front.results.put(delivery)
        if front.results.unsendable:  # (told why: it goes, its requests aborted)
            self._leave(front)
            return
        if sent_stats:
            front.stats_sent_at, front.stats_stale = now, False
        if delivery.publish_stats:
            self._published = delivery.stats

    def fail(self, why: str) -> None:
        """The loop failed: none can join any more, and each front end (one told "ready"
        already among them) gets ``why`` as its last result, then its results end."""
        with self._joining:
            self._admit()
            self._closed = True
            if self._listener is not None:
                with contextlib.suppress(FileNotFoundError):
                    self._listener.close()
        fronts = list(self.front_ends.values())
        for front in fronts:
            front.results.put(why)
            front.results.close()
        deadline = time.monotonic() + SENDERS_EXIT_S
        for front in fronts:
            front.results.join(max(0.0, deadline - time.monotonic()))

    # ---- arrivals and departures -----------------------------------------------------------
    def _accept(self, listener: Listener) -> None:
        while True:
            try:
                conn = listener.accept()
            except (AuthenticationError, EOFError, ConnectionError):  # that caller's problem
                continue
            except OSError:
                if self._closed:  # (the listener closed: the engine is ending)
                    return
                # NOTE: one caller's bad handshake ("bad message length") or a passing
                # shortage (EMFILE) must not stop every later front end from joining
                logger.warning("a front end's connection failed", exc_info=True)
                time.sleep(0.05)
                continue
            with self._joining:
                try:
                    if self._closed:
                        raise ConnectionRefusedError
                    conn.send((*self.hello[:2], self.last_stats, *self.hello[3:]))  # of now
                except OSError:
                    conn.close()
                    continue
                self._accepted.append(conn)
                self._wake_write.send_bytes(b"")

    def _admit(self) -> None:
        while self._wake_read.poll():
            self._wake_read.recv_bytes()
        while self._accepted:
            k = next(self._numbers)
            conn = self._accepted.popleft()
            self.front_ends[k] = FrontEnd(k, conn, Outbox(conn, f"vllm-runner-send-{k}"))
            logger.info("front end %d connected (%d in all)", k, len(self.front_ends))

    def _leave(self, front: FrontEnd) -> None:
        """A front end gone without stopping: its requests are aborted, unread."""
        if self.front_ends.pop(front.number, None) is None:
            return
        self.pending.extend(("abort", f"{front.number}:{rid}") for rid in set(front.live.values()))
        front.live.clear()
        if front.number == self._owner and front.results.stats_sent is not None:
            # (the new publisher counts on from what this one got: the rest is lost with it)
            self._published = front.results.stats_sent
        if not front.results.unsendable:  # (else closed once it is told why)
            front.results.abandon()
        self._closed_front(front)

    def _farewell(self, front: FrontEnd) -> None:
        self.front_ends.pop(front.number, None)
        front.results.put(None)
        front.results.close()
        self._closed_front(front)

    def _closed_front(self, front: FrontEnd) -> None:
        # (a socket's one connection is closed by its results' sender, once done with it)
        if front.commands is not front.results.conn:
            front.commands.close()
        self._senders = [o for o in self._senders if o.sending]
        self._senders.append(front.results)
