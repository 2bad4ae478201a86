"""The engine-core process: its main, and how front ends find a shared one.

A shared engine is named: the first AsyncLLM with a name starts the process, which then
also listens on a Unix socket in a directory only this user can open (with a random key);
others with the same name connect to it. A lock file orders them, so that one process
starts it and the rest wait for it to be ready.
"""

import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import secrets
import signal
import stat
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing import AuthenticationError, reduction
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path

from vllm_runner.engine.core import EngineCore
from vllm_runner.engine.errors import failure_cause
from vllm_runner.engine.front_ends import FrontEnds
from vllm_runner.engine.sampling_defaults import GENERATION_CONFIGS
from vllm_runner.engine.serving_loop import ServingLoop, picklable


def run_engine_process(
    args,
    commands: Connection,
    results: Connection,
    timings: bool,
    log_level: int,
    shared: tuple["SharedEngine", bytes, "HeldLock"] | None = None,
) -> None:
    """Main of the engine-core process (spawned): build the engine, report ("ready",
    limits, stats, model name, pid) or ("failed", exception), then step until every front
    end has gone (stopped, or its end of the pipe closed with its process); if the loop
    fails, each front end is told why (a str) and the process exits with code 1. ``shared``:
    where other front ends connect, its key, and the lock its starter holds (a shared
    engine)."""
    # NOTE: Ctrl-C in a terminal reaches the whole process group, and a process manager
    # stopping the server may signal its children (BentoML's does: SIGTERM); the server then
    # shuts down gracefully (its in-flight streams finish) and stops this process itself, or
    # its end of the command pipe closes when it exits.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.getLogger("vllm_runner").setLevel(log_level)  # (its handler: vllm_runner/__init__)
    on_close = (lambda: None) if shared is None else (lambda: shared[0].forget_key(shared[1]))
    try:
        try:
            engine = EngineCore(args, serving=True)
            listener = None
            if shared is not None:
                place, key, _ = shared
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(place.socket)  # a dead engine's (under the lock)
                listener = Listener(place.socket, "AF_UNIX", authkey=key)
        except BaseException as exc:
            results.send(("failed", picklable(exc)))
            return
        hello = ("ready", engine.limits, engine.stats(), engine.model_config.name, os.getpid())
        try:
            results.send(hello)
        except OSError:  # its starter has gone while it loaded (killed): none will read
            if shared is not None:
                # NOTE: still under the lock: the next front end finds no socket and no
                # key, and only now starts an engine (not beside this one, nor one whose
                # socket this one would replace, then remove as it ends)
                listener.close()
                shared[0].forget_key(shared[1], locked=True)
            logging.getLogger(__name__).warning(
                "the process that started this engine has gone while it loaded: ending"
            )
            return
        if shared is not None:
            shared[2].release()  # (its starter releases it too, now that it is ready)
        front_ends = FrontEnds(commands, results, hello, listener, on_close)
        try:
            ServingLoop(engine, front_ends.emit, timings).run(front_ends.receive)
        except Exception as exc:
            # NOTE: the cause, as text, to every front end: their streams and later requests
            # fail naming it (not only "exited (code 1)"). Raised on: its traceback goes to
            # this process's stderr, and the process exits with code 1.
            front_ends.fail(f"the engine process failed: {failure_cause(exc)}")
            raise
    finally:
        on_close()  # (also when it failed to start or its loop failed: no key left behind)


# how long a front end waits for a running shared engine to answer its connection (it has
# loaded: the listener opens after the model is loaded; the lock file orders the waiting)
CONNECT_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class SharedEngine:
    """Where the engine shared under one name is found."""

    socket: str
    key: Path
    lock: Path

    @classmethod
    def named(cls, name: str, args: object) -> "SharedEngine":
        """The engine of ``name`` and these engine arguments: two services under one server
        that name their engines alike but load different models do not meet."""
        home = Path(tempfile.gettempdir()) / f"vllm-runner-{os.getuid()}"
        home.mkdir(mode=0o700, exist_ok=True)
        info = home.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise PermissionError(f"{home} must be a directory of this user's only (mode 700)")
        # NOTE: the folders themselves, not their names: "model" in two working directories
        # is two models, "m" and "./m" one (so for a generation_config folder)
        folders = {
            name: os.path.realpath(value)
            for name in ("model", "generation_config")
            if isinstance(value := getattr(args, name, None), str)
            and os.path.isdir(value)
            and not (name == "generation_config" and value in GENERATION_CONFIGS)
        }
        if folders:
            args = dataclasses.replace(args, **folders)
        # (a short file name: a Unix socket's path is limited to ~100 bytes)
        stem = hashlib.sha256(f"{name}\n{args!r}".encode()).hexdigest()[:16]
        return cls(str(home / f"{stem}.sock"), home / f"{stem}.key", home / f"{stem}.lock")

    @contextlib.contextmanager
    def locked(self) -> Iterator["HeldLock"]:
        """The lock, held until the block ends (and until the engine process that the
        block starts with it is ready or has ended)."""
        with open(self.lock, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when every copy of f's descriptor closes
            yield HeldLock(f.fileno())

    def new_key(self) -> bytes:
        key = secrets.token_bytes(32)
        fd = os.open(self.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        return key

    def forget_key(self, key: bytes, locked: bool = False) -> None:
        """The engine has stopped listening: its key file goes, unless a newer engine's.
        Only under the lock (``locked``: the caller holds it), not waiting for it: its
        holder is starting or finding an engine and rewrites the file if it starts one (an
        unlink racing that write would leave the new engine without a key file, and the
        next worker would start another)."""
        with contextlib.suppress(OSError), open(self.lock, "a") as f:
            if not locked:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (BlockingIOError: held)
            if self.key.read_bytes() == key:
                self.key.unlink()

    def connect(self, timeout: float = CONNECT_TIMEOUT_S) -> tuple[Connection, tuple] | None:
        """A connection to the running engine and its hello, or None if none runs.
        TimeoutError if it has not answered in ``timeout`` seconds (a stopped or stuck
        process: the kernel still queues connections to its socket)."""
        found: list = []

        def attempt() -> None:
            try:
                conn = Client(self.socket, "AF_UNIX", authkey=self.key.read_bytes())
                found.append((conn, conn.recv()))
            except (OSError, EOFError, AuthenticationError):  # none, or it just ended
                found.append(None)

        # NOTE: Client has no timeout: a thread makes the attempt, left behind if it hangs.
        thread = threading.Thread(target=attempt, name="vllm-runner-connect", daemon=True)
        thread.start()
        thread.join(timeout)
        if not found:
            raise TimeoutError(
                f"the shared engine listening on {self.socket} did not answer in {timeout:g} s "
                "(is its process stopped or stuck? end it, or give this server's engine "
                "another name)"
            )
        return found[0]


class HeldLock:
    """A held lock file's descriptor. Passed to the engine process it starts, the engine
    holds the same lock (one open file) until it is ready, or exits: a starter killed while
    its engine loads does not let the next front end start a second engine beside it."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd

    def __reduce__(self) -> tuple:
        # (a duplicate of the descriptor for the spawned process, as multiprocessing passes
        # the ends of a pipe)
        return _held_lock, (reduction.DupFd(self.fd),)

    def release(self) -> None:
        """This process's copy; the lock is free once no process holds one."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _held_lock(dup) -> HeldLock:
    fd = dup.detach()
    os.set_inheritable(fd, False)  # (a process it starts while loading must not hold it on)
    return HeldLock(fd)
