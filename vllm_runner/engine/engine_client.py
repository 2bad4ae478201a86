"""A front end's link to an engine-core process: start one (or find the running one it
shares), send it commands, read its results, and say why it stopped."""

import contextlib
import logging
import multiprocessing
import multiprocessing.util
import pickle
import queue
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler

from vllm_runner.engine.engine_process import HeldLock, SharedEngine, run_engine_process
from vllm_runner.engine.serving_loop import Delivery

logger = logging.getLogger(__name__)


class EngineClient:
    def __init__(self) -> None:
        self.process = None  # the engine process, if this client started it
        self.pid: int | None = None
        self.shared = False
        self._reaper: threading.Thread | None = None  # joins a shared engine this started
        self._connections: tuple[Connection, ...] = ()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()  # commands' bytes, in order

    def start(self, args, log_stats: bool, shared: str | None) -> tuple:
        """Start the engine process, or connect to the one shared under ``shared``; returns
        its (limits, stats, model name)."""
        if shared is None:
            return self._spawn(args, log_stats, None)
        self.shared = True
        place = SharedEngine.named(shared, args)
        with place.locked() as lock:
            found = place.connect()
            if found is None:
                return self._spawn(args, log_stats, place, lock)
        conn, (_, limits, stats, name, self.pid) = found
        logger.info("connected to the shared engine process (pid %d)", self.pid)
        self._attach(conn, conn)
        return limits, stats, name

    def _spawn(
        self, args, log_stats: bool, place: SharedEngine | None, lock: HeldLock | None = None
    ) -> tuple:
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        commands_out, commands_in = ctx.Pipe(duplex=False)
        results_out, results_in = ctx.Pipe(duplex=False)
        level = logging.getLogger("vllm_runner").getEffectiveLevel()
        # (``lock``: the engine holds it too until it is ready, see HeldLock)
        shared = None if place is None else (place, place.new_key(), lock)
        self.process = ctx.Process(
            target=run_engine_process,
            # (request timings for whichever front ends connect and want them)
            args=(args, commands_out, results_in, log_stats or shared is not None, level, shared),
            name="vllm-runner-engine",
            daemon=True,
        )
        self.process.start()
        self.pid = self.process.pid
        logger.info("engine core in its own process (pid %d)", self.pid)
        commands_out.close()  # the process's ends: EOF here when it exits
        results_in.close()
        if place is not None:
            # NOTE: multiprocessing would wait at this interpreter's exit for the engine,
            # which others may still use: it ends when the last of them has gone (and a
            # thread here reaps it then, so that no zombie is left while this one runs on).
            multiprocessing.process._children.discard(self.process)
            self._reaper = threading.Thread(
                target=self.process.join, name="vllm-runner-reap", daemon=True
            )
            self._reaper.start()
        # (interrupted while it loads, e.g. Ctrl-C: a shared engine, not killed by the
        # caller, sees its first front end go and ends once loaded)
        self._connections = (commands_in, results_out)
        try:
            reply = results_out.recv()
        except EOFError:
            self.wait()
            if place is not None:
                place.forget_key(shared[1], locked=True)
            raise RuntimeError(
                f"the engine process exited with code {self.process.exitcode} while loading "
                "(its error is printed above; a script that starts one needs the usual "
                "`if __name__ == '__main__':` guard of spawned processes, or engine_process="
                "False)"
            ) from None
        if reply[0] == "failed":
            self.wait()
            if place is not None:  # (its own attempt found this lock held: it is ours)
                place.forget_key(shared[1], locked=True)
            raise reply[1]
        self._attach(commands_in, results_out)
        _, limits, stats, name, _ = reply
        return limits, stats, name

    def _attach(self, commands: Connection, results: Connection) -> None:
        # NOTE: the engine process ignores SIGTERM (a server's graceful stop) and forgets
        # this front end when its end of the connection closes: with this object, or at
        # interpreter exit before multiprocessing joins its children.
        multiprocessing.util.Finalize(self, commands.close, exitpriority=100)
        multiprocessing.util.Finalize(self, self._outbox.put, args=(None,))  # (its writer ends)
        self._connections = (commands, results)
        threading.Thread(
            target=_write, args=(commands, self._outbox), name="vllm-runner-send", daemon=True
        ).start()

    def send(self, command: tuple) -> None:
        if command[0] == "add":
            # NOTE: the request itself as bytes of its own, loaded by the engine's loop: one
            # it cannot load (an object of a class defined in a notebook) fails alone; in the
            # command it failed the whole command stream, and the engine ended for everyone.
            kind, request_id, route, *request = command
            command = (kind, request_id, route, pickle.dumps(request, pickle.HIGHEST_PROTOCOL))
        # NOTE: written by a thread of its own: the engine reads commands between steps, and
        # one larger than the pipe's buffer (a long prompt) held the caller (a server's event
        # loop, every stream of it) until then. A closed pipe is the reader's to report.
        self._outbox.put(ForkingPickler.dumps(command))
        if command[0] == "stop":  # (the engine forgets this front end: nothing follows)
            self._outbox.put(None)

    def read(self, deliver: Callable[[Delivery], None]) -> None:
        """Hand each step's results to ``deliver`` until the engine ends this front end's,
        or says why it ends them (its loop failed: raised as EngineFailed)."""
        try:
            while (delivery := self._connections[1].recv()) is not None:
                if isinstance(delivery, str):
                    raise EngineFailed(delivery)
                deliver(delivery)
        finally:
            # NOTE: the engine has forgotten this front end (or gone): the sender of its
            # commands ends now, not when the AsyncLLM is collected (shutdown() sends none)
            self._outbox.put(None)

    def join(self) -> None:
        """After a stop: wait for the engine process this client started and alone uses
        to exit (a shared one ends with its last front end)."""
        if self.process is not None and not self.shared:
            self.process.join()

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the engine process this client started to exit."""
        (self._reaper or self.process).join(timeout)

    def detach(self) -> None:
        """Close the connections: the engine process forgets this front end (and ends if
        it was the last)."""
        self._outbox.put(None)
        for conn in self._connections:
            conn.close()

    def close_after_failed_start(self) -> None:
        self.detach()
        # (pid None: its start failed, e.g. no memory to fork; its own error is raised)
        if self.process is not None and self.process.pid is not None and not self.shared:
            self.process.kill()
            self.process.join()

    def _engine_alive(self) -> bool:
        if self.process is not None:
            return self.process.is_alive()
        # (another process's child: dead but not yet reaped, it is a zombie, state Z)
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except (OSError, IndexError):
            return False

    def stopped_because(self, exc: BaseException) -> str:
        """Why reading the results ended with ``exc``."""
        if isinstance(exc, EngineFailed):  # (it exits now: reaped, if this one's alone)
            if self.process is not None and not self.shared:
                self.wait(timeout=5)
            return str(exc)
        if isinstance(exc, EOFError | OSError):  # its end of the pipe closed: it exited
            if self.process is not None:
                self.wait(timeout=5)
            else:  # (its sockets close before it is a zombie: an exiting one looks alive)
                deadline = time.monotonic() + 5
                while self._engine_alive() and time.monotonic() < deadline:
                    time.sleep(0.05)
            if self._engine_alive():  # (front_ends.MAX_BACKLOG)
                return (
                    f"the shared engine process (pid {self.pid}) dropped this front end: it "
                    "read too few of its results (was its process stopped?)"
                )
            if self.process is None:  # another process's
                return f"the engine process (pid {self.pid}) exited"
            return f"the engine process exited (code {self.process.exitcode})"
        logger.exception("reading the engine process's results failed")
        if self.shared:  # the others go on: the engine forgets this front end
            self.detach()
        else:
            # NOTE: the engine is alive but its results can no longer be read: stop it (it
            # holds the device's memory) rather than leave it running unread.
            self.process.kill()
            self.process.join()
        return f"reading the engine process's results failed: {exc!r}"


class EngineFailed(Exception):
    """The engine process ended this front end's results saying why (its loop failed, or
    it could not send them); the reason, as it sent it."""


def _write(conn: Connection, outbox: queue.SimpleQueue) -> None:
    """Send each command's bytes, in order, until None (detached, or the client is gone) or
    the pipe closes (the engine process ended)."""
    with contextlib.suppress(OSError):
        while (data := outbox.get()) is not None:
            conn.send_bytes(data)
