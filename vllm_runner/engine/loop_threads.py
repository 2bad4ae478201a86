"""The thread through which an AsyncLLM reaches its engine (the loop itself, or the reader
of its engine process's results), and the stop its engine gets when the AsyncLLM is
collected without ``shutdown()``, as vLLM's AsyncLLM shuts down on garbage collection.

NOTE: a thread refers to its AsyncLLM only weakly: one that held it (a closure, a bound
method) kept an AsyncLLM its user had dropped, its engine and the device's memory alive
until the interpreter exited.
"""

import contextlib
import logging
import queue
import threading
import weakref
from collections.abc import Callable, Coroutine, Iterator

from vllm_runner.engine.engine_client import EngineClient
from vllm_runner.engine.errors import failure_cause
from vllm_runner.engine.serving_loop import Delivery, ServingLoop

logger = logging.getLogger(__name__)


class FrontEndRef:
    """What a thread needs of its AsyncLLM, through a weak reference: nothing once the
    AsyncLLM has gone (its streams have gone with it)."""

    def __init__(self, llm) -> None:
        self._llm = weakref.ref(llm)

    def running(self) -> bool:
        llm = self._llm()
        return llm is not None and llm._running

    def gone(self) -> bool:
        return self._llm() is None

    def deliver(self, delivery: Delivery) -> None:
        llm = self._llm()
        if llm is not None:
            llm._deliver(delivery)

    def guarded(self, loop: Callable[[], None], stopped_because: Callable[..., str]) -> None:
        """Run the loop while the AsyncLLM runs; if it stops on its own (a bug, or the engine
        process died), the AsyncLLM fails its streams with the reason
        (``stopped_because(exc)``); if it stops as told, or was shut down before the loop
        started, those whose requests came too late (another thread's shutdown)."""
        reason = None
        try:
            if self.running():
                loop()
        except BaseException as exc:
            reason = stopped_because(exc)
        llm = self._llm()
        if llm is not None:
            llm._loop_stopped(reason)


def start_loop_thread(llm, build: Callable, go: threading.Event, timings: bool) -> tuple:
    """Start the loop's thread, which builds the engine it steps (``build()``; its error is
    raised here) and, once ``go`` is set, steps it while ``llm`` runs; returns (thread,
    engine, send: a command to the loop)."""
    commands: queue.SimpleQueue = queue.SimpleQueue()
    built = threading.Event()
    made: list = []  # the engine, or what building it raised
    front = FrontEndRef(llm)

    def receive(block: bool) -> tuple | None:
        try:
            return commands.get(block)
        except queue.Empty:
            return None

    def run() -> None:
        try:
            made.append(build())
        except BaseException as exc:  # raised again in the caller's thread
            made.append(exc)
            return
        finally:
            built.set()
        go.wait()
        front.guarded(
            lambda: ServingLoop(made[0], front.deliver, timings=timings).run(receive), _loop_failed
        )

    thread = threading.Thread(target=run, name="vllm-runner-engine", daemon=True)
    thread.start()
    built.wait()
    if isinstance(made[0], BaseException):
        raise made[0]
    return thread, made[0], commands.put


def start_reader_thread(llm, client: EngineClient, go: threading.Event) -> threading.Thread:
    """Start the thread that, once ``go`` is set, hands the engine process's results to
    ``llm`` while it runs (and reaps the process if ``llm`` was dropped unshut)."""
    front = FrontEndRef(llm)

    def run() -> None:
        go.wait()
        front.guarded(lambda: client.read(front.deliver), client.stopped_because)
        if front.gone():  # (its stop sent as it was collected: wait as shutdown() would)
            client.join()

    thread = threading.Thread(target=run, name="vllm-runner-results", daemon=True)
    thread.start()
    return thread


def stop_when_collected(llm, send: Callable[[tuple], None]) -> weakref.finalize:
    """Sends the loop its stop, once: when called (``shutdown()``) or when ``llm`` is
    collected unshut. Quick (the loop thread or the reader ends on its own after it), so
    that it never holds up the collector."""
    finalizer = weakref.finalize(llm, _stop, send)
    # NOTE: not at interpreter exit: a loop thread ends with the interpreter, and an engine
    # process when its command pipe closes (EngineClient), as when no stop was sent.
    finalizer.atexit = False
    return finalizer


class StoppedEngine(Coroutine):
    """What ``AsyncLLM.shutdown()`` returns once the engine has stopped: awaiting it (or
    ``asyncio.run`` of it) returns at once; dropped unawaited, it does not warn."""

    def send(self, value: object) -> None:
        raise StopIteration

    def throw(self, typ, val=None, tb=None):  # (as Coroutine's: raise it)
        return super().throw(typ, val, tb)

    def __await__(self) -> Iterator[None]:
        return iter(())


def _stop(send: Callable[[tuple], None]) -> None:
    with contextlib.suppress(OSError):  # (the engine process has gone already)
        send(("stop",))


def _loop_failed(exc: BaseException) -> str:
    logger.exception("the engine loop failed")
    return f"the engine loop failed: {failure_cause(exc)}"  # (as an engine process's)
