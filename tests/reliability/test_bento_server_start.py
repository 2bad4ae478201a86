"""BentoServer's start and readiness: a start that lost one of its ports to another process
is tried again on fresh ports, any other failure is raised at once (CI saw circus's control
socket taken: `bentoml serve` reserves a port by binding and releasing it, then binds it
again); ready once every worker has logged its engine ready."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtests.server import START_TRIES, BentoServer

TAKEN = "zmq.error.ZMQError: Address already in use (addr='tcp://127.0.0.1:36751')\n"


class Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def ready_url() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ready)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def fake_starts(srv: BentoServer, url: str, outcomes: list[str]) -> list[str]:
    """Make srv's spawns play `outcomes` in order: "taken" (exits 1 after logging a port
    already in use), "crash" (exits 1 after logging another error), "ready" (runs, logs its
    engine ready, /readyz at `url` answers 200). Returns the outcomes played so far."""
    played: list[str] = []

    def spawn() -> None:
        outcome = outcomes[len(played)]
        played.append(outcome)
        srv._log_start = srv.log.stat().st_size if srv.log.exists() else 0
        line = {"taken": TAKEN, "crash": "ValueError: bad setting\n",
                "ready": "[entry_service:LLMService:1] model m ready\n"}[outcome]  # fmt: skip
        with srv.log.open("a") as f:
            f.write(line)
        code = "import time; time.sleep(60)" if outcome == "ready" else "raise SystemExit(1)"
        srv.proc = subprocess.Popen([sys.executable, "-c", code])
        if outcome != "ready":
            srv.proc.wait()
        srv.url = url

    srv._spawn = spawn  # type: ignore[method-assign]
    return played


def test_a_start_that_lost_a_port_is_tried_again(tmp_path: Path, ready_url: str) -> None:
    srv = BentoServer(tmp_path / "serve.log")
    played = fake_starts(srv, ready_url, ["taken", "taken", "ready"])
    try:
        assert srv.start(timeout=30) is srv
        assert played == ["taken", "taken", "ready"] and srv.running
    finally:
        srv.stop()


def test_losing_a_port_every_time_raises_after_the_last_try(tmp_path: Path, ready_url) -> None:
    srv = BentoServer(tmp_path / "serve.log")
    played = fake_starts(srv, ready_url, ["taken"] * (START_TRIES + 1))
    with pytest.raises(RuntimeError, match="Address already in use"):
        srv.start(timeout=30)
    assert played == ["taken"] * START_TRIES


def test_another_failure_is_raised_at_once(tmp_path: Path, ready_url: str) -> None:
    srv = BentoServer(tmp_path / "serve.log")
    played = fake_starts(srv, ready_url, ["crash", "ready"])
    with pytest.raises(RuntimeError, match="bad setting"):
        srv.start(timeout=30)
    assert played == ["crash"]


def test_an_earlier_starts_lost_port_does_not_count(tmp_path: Path, ready_url: str) -> None:
    """Only what this start logged decides: a port lost by an earlier start, then a crash."""
    srv = BentoServer(tmp_path / "serve.log")
    srv.log.write_text(TAKEN)
    played = fake_starts(srv, ready_url, ["crash", "ready"])
    with pytest.raises(RuntimeError, match="bad setting"):
        srv.start(timeout=30)
    assert played == ["crash"]


def test_the_server_is_ready_when_every_worker_has_logged_its_engine_ready(
    tmp_path: Path, ready_url: str
) -> None:
    """/readyz answers from whichever worker takes the connection: a load step must wait
    for every worker (found on a card: the first GET of a step reached one still connecting
    to the shared engine, 503)."""
    log = tmp_path / "serve.log"
    log.write_text("[entry_service:LLMService:1] model m ready (an earlier start's line)\n")
    srv = BentoServer(log, args={"workers": "2"})
    srv._log_start = log.stat().st_size
    srv.url = ready_url
    srv.proc = subprocess.Popen(["sleep", "60"])
    try:
        with log.open("a") as f:
            f.write("[entry_service:LLMService:1] model m ready (max_model_len 8)\n")
        with pytest.raises(TimeoutError, match="1 of 2 workers ready"):
            srv.wait_ready(1.0)
        with log.open("a") as f:
            f.write("[entry_service:LLMService:2] model m ready (max_model_len 8)\n")
        srv.wait_ready(5.0)
    finally:
        srv.proc.kill()
        srv.proc.wait()
