"""locustfile.py's users in a real headless locust run, against a canned HTTP server."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtests import run
from loadtests.report import read_step
from loadtests.server import free_port


class SlowStreams(http.server.BaseHTTPRequestHandler):
    """POST /generate: two text chunks `GAP_S` apart, then the end of the body (chunked, as
    uvicorn streams)."""

    GAP_S = 2.0
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for piece in (b"Once", b" upon", b""):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.flush()
            if piece:
                time.sleep(self.GAP_S)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def slow_server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowStreams)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def locust(url: str, prefix: Path, users: int, processes: int = 1) -> str:
    """A headless locust run of `users` GenerateUsers for 1 s, with 30 s to drain."""
    cmd = [sys.executable, "-m", "locust", "-f", str(run.LOCUSTFILE), "--headless"]
    cmd += ["-u", str(users), "-r", str(users), "-t", "1s", "--stop-timeout", "30"]
    cmd += ["--host", url, "--csv", str(prefix), "--only-summary", "GenerateUser"]
    if processes > 1:
        port = str(free_port())
        cmd += ["--processes", str(processes), "--master-bind-port", port, "--master-port", port]
    env = {**os.environ, "LOADTEST_MAX_TOKENS": "2"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


@pytest.mark.timeout(120)
def test_requests_that_end_in_the_drain_are_in_the_csv(slow_server: str, tmp_path: Path) -> None:
    """locust rewrites its --csv files once a second while it runs, not at exit: the requests
    that ended in the last second before it exited, i.e. those a step's drain
    (--stop-timeout) waits for, were missing (a 1-user step whose one request ended in the
    drain read 0 requests; a failure there would have passed the run)."""
    log = locust(slow_server, tmp_path / "u1", users=1)
    step = read_step(1, tmp_path / "u1")
    assert step.requests == 1, log
    assert step.output_tokens == 2, log
    assert set(step.ttft_ms) == set(step.itl_ms) == {"/generate"}, log


@pytest.mark.timeout(120)
def test_with_processes_the_requests_in_flight_at_the_end_are_counted(
    slow_server: str, tmp_path: Path
) -> None:
    """With --processes, locust's master quit at the end of -t without stopping its workers
    and waited 0.5 s for their last stats: the requests then in flight (every user's last),
    which --stop-timeout should let finish, were missing from every statistic; the workers
    outlived the master."""
    log = locust(slow_server, tmp_path / "u2", users=2, processes=2)
    step = read_step(2, tmp_path / "u2")
    assert step.requests == 2 and step.output_tokens == 4, log
    assert log.count("Got quit message from master") == 2, log
