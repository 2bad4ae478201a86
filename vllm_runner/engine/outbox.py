"""A front end's results, sent by a thread of their own.

The engine process's loop pickles each step's delivery and queues the bytes; a thread per
front end writes them. A front end whose process is alive but reads nothing (a stopped
process) then fills its own socket and queue, and holds back neither the engine's steps nor
the other front ends; the loop drops it once it is too far behind (``backlog``).

The pickling stays on the loop's thread: a sender that pickled would hold the GIL while the
loop waits for it (H200, 1B shape, 256 closed-loop streams over 4 front ends, medians:
26.4k tok/s with the senders pickling, 36.6k with the loop pickling, 36.3k before the
outbox; loadtests/RESULTS.md).
"""

import contextlib
import logging
import os
import queue
import socket
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler

from vllm_runner.engine.errors import failure_cause

logger = logging.getLogger(__name__)

_CLOSE = object()  # the queue's end: close the connection after what came before


class Outbox:
    def __init__(self, conn: Connection, name: str) -> None:
        self.conn = conn
        self._items: queue.SimpleQueue = queue.SimpleQueue()
        # NOTE: one counter per thread (``+=`` on a shared one is not atomic across threads)
        self._queued = 0  # by the loop
        self._sent = 0  # by the sender (sent, or dropped after a failure)
        self.failed = False  # a send failed: the front end's process is gone
        self.unsendable = False  # a result did not pickle: the front end was told why
        self.stats_sent: dict | None = None  # those of the last delivery sent whole
        self.sent_at = time.monotonic()  # when the last send ended (or this began)
        self._abandoned = False
        self._closing = threading.Lock()  # a closed descriptor's number may be reused at once
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def backlog(self) -> int:
        """Items queued and not sent yet."""
        return self._queued - self._sent

    def put(self, item: object) -> None:
        """Queue ``item`` (pickled here, as ``Connection.send`` would) to be sent."""
        self._queued += 1
        if self.failed or self._abandoned or self.unsendable:  # (counted: sent as nothing)
            self._items.put((b"", None))
            return
        try:
            data = ForkingPickler.dumps(item)
        except Exception as exc:  # (e.g. not picklable, a bug): the loop drops this front end
            logger.exception("sending results failed")
            # NOTE: told why, then its results end (else it blamed itself, "read too few of
            # its results", or said the engine "exited (code 0)")
            self.unsendable = True
            why = (
                f"the engine process failed to send this front end's results: {failure_cause(exc)}"
            )
            self._items.put((ForkingPickler.dumps(why), None))
            self._items.put(_CLOSE)
            return
        self._items.put((data, getattr(item, "stats", None)))

    def close(self) -> None:
        """Send what is queued, then close the connection."""
        self._items.put(_CLOSE)

    def abandon(self) -> None:
        """Close without sending what is queued. A send blocked on a full socket fails at
        once (a pipe's stays blocked until its reader reads or goes: a daemon thread)."""
        self._abandoned = True
        self._items.put(_CLOSE)
        with self._closing:
            if self._closed:
                return
            # (shut down through a duplicate: closing the descriptor under a blocked send
            # would not wake it)
            fd = os.dup(self.conn.fileno())
            try:
                s = socket.socket(fileno=fd)
            except OSError:  # not a socket (a pipe)
                os.close(fd)
                return
            with s, contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    @property
    def sending(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        while (item := self._items.get()) is not _CLOSE:
            if not (self.failed or self._abandoned):
                data, stats = item
                try:
                    self.conn.send_bytes(data)  # (the GIL is released while it writes)
                except (OSError, ValueError):  # its process is gone (or it was shut down)
                    self.failed = True
                except Exception:
                    logger.exception("sending results failed")
                    self.failed = True
                else:
                    self.stats_sent = stats if stats is not None else self.stats_sent
                    self.sent_at = time.monotonic()
            self._sent += 1
        with self._closing:
            self._closed = True
            self.conn.close()
