"""A `bentoml serve` subprocess of this repository's service on a free loopback port.

Used by `loadtests/run.py` (when no --host is given) and by the reliability tests.
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 240.0
# what service.py logs when a worker's engine is ready
WORKER_READY = re.compile(r"\[entry_service:LLMService:(\d+)\] model \S+ ready")
PORT_TAKEN = "Address already in use"  # a start that lost a port to another process
START_TRIES = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_loopback(url: str) -> str:
    """`url` without a trailing slash; ValueError unless its host is a loopback address."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):  # "127.0.0.1:3000" reads as scheme "127.0.0.1"
        raise ValueError(f"--host must be an http:// or https:// URL, got {url!r}")
    host = parts.hostname or ""
    if host != "localhost":
        try:
            if not ipaddress.ip_address(host).is_loopback:
                raise ValueError
        except ValueError:
            raise ValueError(f"only loopback hosts are allowed, got {url!r}") from None
    return url.rstrip("/")


class BentoServer:
    """`bentoml serve` (service from bentofile.yaml) with `env` and `--arg`s, logging to `log`."""

    def __init__(
        self,
        log: Path,
        env: Mapping[str, str] | None = None,
        args: Mapping[str, str] | None = None,
        home: Path | None = None,
    ) -> None:
        self.log = Path(log)
        self.env = dict(env or {})
        self.args = dict(args or {})
        self.home = home
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.api_key = self.env.get("VLLM_RUNNER_API_KEY")
        self._log_start = 0  # where this start's lines begin (the log is appended to)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = READY_TIMEOUT_S) -> BentoServer:
        """Serve and wait until ready. `bentoml serve` reserves its ports (HTTP, and circus's
        control sockets) by binding and releasing them, so another process can take one
        before it binds again: a start that exits on "Address already in use" is tried again
        on fresh ports, up to START_TRIES times."""
        tries = 1
        while True:
            self._spawn()
            try:
                self.wait_ready(timeout)
                return self
            except BaseException as exc:
                self.stop(signal.SIGKILL)
                lost_race = isinstance(exc, RuntimeError) and PORT_TAKEN in self._new_logs()
                if not lost_race or tries == START_TRIES:
                    raise
                tries += 1

    def _spawn(self) -> None:
        env = {**os.environ, **self.env}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # bentoml serve makes its own
        if self.home is not None:
            env["BENTOML_HOME"] = str(self.home)
        port = free_port()
        cmd = [sys.executable, "-m", "bentoml", "serve", "--host", "127.0.0.1", "--port", str(port)]
        for name, value in self.args.items():
            cmd += ["--arg", f"{name}={value}"]
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._log_start = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        self.url = f"http://127.0.0.1:{port}"

    @property
    def workers(self) -> int:
        """The server's worker processes (the `workers` setting: --arg, then env)."""
        value = self.args.get("workers") or self.env.get("VLLM_RUNNER_WORKERS")
        return int(value or os.environ.get("VLLM_RUNNER_WORKERS") or 1)

    def wait_ready(self, timeout: float) -> None:
        """Until /readyz answers 200 and every worker has logged its engine ready: /readyz
        reaches whichever worker takes the connection, and the workers get ready one by
        one (a load step started earlier sends some requests to one still connecting)."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"bentoml serve exited early:\n{self.logs()}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=5) as r:
                    ready = set(WORKER_READY.findall(self._new_logs()))
                    if r.status == 200 and len(ready) >= self.workers:
                        return
                    last = f"{len(ready)} of {self.workers} workers ready"
            except (urllib.error.URLError, OSError) as exc:
                last = exc
            time.sleep(0.25)
        raise TimeoutError(f"{self.url}/readyz not 200 after {timeout}s ({last})\n{self.logs()}")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60.0) -> int | None:
        """Signal the server and wait; returns its exit code (None if it never ran)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def logs(self, tail: int = 6000) -> str:
        try:
            return self.log.read_text(errors="replace")[-tail:]
        except FileNotFoundError:
            return ""

    def _new_logs(self) -> str:
        """What this start of the server has logged."""
        try:
            with open(self.log, "rb") as f:
                f.seek(self._log_start)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> BentoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
