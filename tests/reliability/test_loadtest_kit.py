"""The load-testing kit (loadtests/): PNG writer, loopback guard, CSV parsing and SLO checks,
and a short real sweep of locust against the server."""

from __future__ import annotations

import csv
import struct
import zlib
from pathlib import Path

import pytest
from service_testing import API_KEY

from loadtests import run
from loadtests.plot import PALETTE, Canvas, Series, line_plot, png_bytes
from loadtests.report import Slo, read_step
from loadtests.server import BentoServer, require_loopback


def png_chunks(data: bytes) -> dict[bytes, bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, at = {}, 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length : at + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        chunks[kind] = body
        at += 12 + length
    return chunks


def test_png_round_trips_its_pixels() -> None:
    c = Canvas(5, 3)
    c.dot(1, 2, (10, 20, 30))
    chunks = png_chunks(png_bytes(5, 3, bytes(c.pixels)))
    assert struct.unpack(">IIBBBBB", chunks[b"IHDR"]) == (5, 3, 8, 2, 0, 0, 0)
    raw = zlib.decompress(chunks[b"IDAT"])
    rows = [raw[y * 16 : (y + 1) * 16] for y in range(3)]  # filter byte + 5 RGB pixels
    assert all(row[0] == 0 for row in rows)
    assert rows[2][1 + 3 : 1 + 6] == bytes((10, 20, 30))
    assert set(rows[0][1:]) == {255}
    assert b"IEND" in chunks


def test_line_plot_draws_every_series(tmp_path: Path) -> None:
    path = tmp_path / "p.png"
    series = [
        Series("a p50", [1, 5, 2], PALETTE[0]),
        Series("b p99", [3, None, 9], PALETTE[1], True),
    ]
    line_plot(path, "TITLE", "USERS", "MS", [1, 4, 16], series, size=(320, 200))
    raw = zlib.decompress(png_chunks(path.read_bytes())[b"IDAT"])
    for color in (PALETTE[0], PALETTE[1]):
        assert bytes(color) in raw


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("http://127.0.0.1:3000", True),
        ("http://127.8.0.1:3000/", True),
        ("http://localhost:3000", True),
        ("http://[::1]:3000", True),
        ("http://10.0.0.1:3000", False),
        ("http://0.0.0.0:3000", False),
        ("http://example.com", False),
    ],
)
def test_only_loopback_hosts(url: str, ok: bool) -> None:
    if ok:
        assert require_loopback(url) == url.rstrip("/")
    else:
        with pytest.raises(ValueError, match="loopback"):
            require_loopback(url)


def test_run_refuses_a_remote_host_before_sending_anything() -> None:
    with pytest.raises(SystemExit) as exit_info:
        run.main(["--host", "http://192.168.1.10:3000", "--users", "1"])
    assert exit_info.value.code == 2


def write_csv(path: Path, rows: list[dict[str, object]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_failures_are_sorted_by_kind_and_slos_checked(tmp_path: Path) -> None:
    def stat(kind: str, name: str, count: int, p50: float, p99: float, size: float = 0) -> dict:
        return {
            "Type": kind, "Name": name, "Request Count": count, "50%": p50, "99%": p99,
            "Average Content Size": size, "Requests/s": count / 10,
        }  # fmt: skip

    write_csv(
        tmp_path / "u4_stats.csv",
        [
            stat("POST", "/generate", 20, 900, 2000),
            stat("TTFT", "/generate", 18, 300, 1200),
            stat("ITL", "/generate", 500, 40, 90),
            stat("TOKENS", "/generate", 18, 9, 14, size=32),
        ],
    )
    write_csv(
        tmp_path / "u4_failures.csv",
        [
            # as locust writes them: the repr of the exception given to resp.failure()
            {
                "Method": "POST",
                "Name": "/generate",
                "Error": "CatchResponseError('5xx 500: boom')",
                "Occurrences": 1,
            },
            {
                "Method": "POST",
                "Name": "/generate",
                "Error": "CatchResponseError('429 429: busy')",
                "Occurrences": 3,
            },
        ],
    )
    step = read_step(4, tmp_path / "u4")
    assert step.requests == 20 and step.output_tokens == 18 * 32
    assert step.tokens_per_s == pytest.approx(1.8 * 32)
    assert step.ttft_ms == {"/generate": (300, 1200)} and step.itl_ms == {"/generate": (40, 90)}
    assert step.failures == {"5xx": 1, "429": 3} and step.fatal == 1
    assert Slo(ttft_p99_ms=1500, itl_p99_ms=100, min_tokens_per_s=50).misses(step) == []
    misses = Slo(ttft_p99_ms=1000, itl_p99_ms=50).misses(step)
    assert len(misses) == 2 and "TTFT p99 1200 > 1000 ms" in misses[0]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_short_sweep_against_the_server(server: BentoServer, tmp_path: Path) -> None:
    args = ["--host", server.url, "--api-key", API_KEY, "--users", "1,3", "--duration", "6"]
    args += ["--stop-timeout", "30", "--max-tokens", "4", "--prompt-words", "4,24"]
    assert run.main([*args, "--out", str(tmp_path)]) == 0, (tmp_path / "summary.md").read_text()
    with open(tmp_path / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["users"]) for r in rows] == [1, 3]
    assert all(float(r["output_tokens_per_s"]) > 0 and r["fatal_failures"] == "0" for r in rows)
    step = read_step(3, tmp_path / "u3")
    assert set(step.ttft_ms) == {"/generate", "/v1/chat/completions"}
    assert step.output_tokens % 4 == 0  # every request made exactly max_tokens tokens
    assert "result: PASS" in (tmp_path / "summary.md").read_text()
    for name in ("throughput.png", "ttft.png", "itl.png"):
        assert png_chunks((tmp_path / name).read_bytes())[b"IHDR"]
    assert Slo(min_tokens_per_s=1e9).misses(step)  # what a missed SLO would report


def test_engine_tokens_count_every_workers_engine() -> None:
    """Workers with an engine each (engine_process off): GET /stats answers from whichever
    worker takes it, so a step's "before" and "after" may be two engines' totals. The
    service-wide total is /metrics' counter, summed over the workers."""
    import http.server
    import itertools
    import threading

    engines = itertools.cycle([100, 7])  # the two workers' engines, in turn
    metrics = (
        'vllm_runner_generation_tokens_total{model_name="m"} 100.0\n'
        'vllm_runner_generation_tokens_total{model_name="m"} 7.0\n'
    )

    class Workers(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            stats = f'{{"generation_tokens_total": {next(engines)}}}'
            body = (metrics if self.path == "/metrics" else stats).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Workers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert [run.engine_tokens(url, {}) for _ in range(2)] == [107, 107]
    finally:
        server.shutdown()
        server.server_close()


_BACKOFF_CHECK = """
import locust  # first: it patches ssl with gevent
from types import SimpleNamespace
from loadtests import locustfile
waits = []
locustfile.time.sleep = waits.append
for status in (401, 429, 503):
    failures = []
    locustfile.refused(SimpleNamespace(status_code=status, text="no", failure=failures.append))
    print(failures[0])
print(waits == [locustfile.BACKOFF_429_S] * 2)
"""


def test_processes_must_be_positive() -> None:
    with pytest.raises(SystemExit):
        run.parse_args(["--processes", "0"])
    assert run.parse_args(["--processes", "4"]).processes == 4


def test_locust_users_back_off_after_a_4xx() -> None:
    """A wrong API key made every closed-loop user retry at once (~1,700 requests a second):
    each non-200 is recorded by kind, and a 4xx (429 included) waits before the next. (In a
    subprocess: importing locust patches this process with gevent.)"""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _BACKOFF_CHECK], capture_output=True, text=True, check=True,
        cwd=Path(run.__file__).parents[1],
    ).stdout.split("\n")  # fmt: skip
    assert out[:4] == ["4xx 401: no", "429 429: no", "5xx 503: no", "True"], out


_PROMPTS_PER_PROCESS = """
import locust  # first: it patches ssl with gevent
import itertools
from types import SimpleNamespace
from locust.env import Environment
from loadtests import locustfile

def prompts(worker_index):
    locustfile.LLMUser._started = itertools.count()  # as in a fresh locust process
    env = Environment(user_classes=[locustfile.ChatUser])
    env.runner = SimpleNamespace(worker_index=worker_index)
    locustfile.ChatUser.host = "http://127.0.0.1:1"
    user = locustfile.ChatUser(env)
    user.on_start()
    return [user.prompt() for _ in range(3)]

print(prompts(0) == prompts(0), prompts(0) != prompts(1))
"""


def test_locust_processes_draw_different_prompts() -> None:
    """With --processes N each locust process counts its users from 0: the n-th user of
    every process drew the same prompts, which the engine's prefix cache then mostly skipped
    (N copies of each prompt). Users still draw the same prompts run to run."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _PROMPTS_PER_PROCESS], capture_output=True, text=True, check=True,
        cwd=Path(run.__file__).parents[1],
    ).stdout  # fmt: skip
    assert out.split() == ["True", "True"], out


_NO_RESPONSE_CHECK = """
import locust  # first: it patches ssl with gevent
import requests
from locust.clients import ResponseContextManager
from loadtests import locustfile
resp = ResponseContextManager(requests.ConnectionError("connection refused"))  # (status 0)
failures = []
resp.failure = failures.append
locustfile.refused(resp)
print(failures[0])
"""


def test_a_request_that_got_no_response_is_a_transport_failure() -> None:
    """locust answers a request whose connection failed (refused, reset before the
    headers) with status 0: a transport failure naming why, not a "4xx" (the summary's
    "other 4xx" column)."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _NO_RESPONSE_CHECK], capture_output=True, text=True, check=True,
        cwd=Path(run.__file__).parents[1],
    ).stdout  # fmt: skip
    assert out.startswith("transport ConnectionError: connection refused"), out


_SPAWNS_A_BUSY_CHILD = """
import multiprocessing as mp, sys, time
def burn():
    end = time.process_time() + 0.5
    while time.process_time() < end:
        pass
    sys.stdout.flush()
    time.sleep(60)
if __name__ == "__main__":
    mp.get_context("spawn").Process(target=burn, daemon=True).start()
    time.sleep(60)
"""


def test_server_cpu_finds_the_tree_and_its_roles(tmp_path: Path) -> None:
    """A parent and its spawned child (as a worker spawns the engine process): both found,
    the child in the engine's role, its busy half second counted."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from loadtests.server_cpu import per_second, tree_cpu_s

    script = tmp_path / "tree.py"
    script.write_text(_SPAWNS_A_BUSY_CHILD)
    parent = subprocess.Popen([sys.executable, str(script)])
    try:
        deadline = time.monotonic() + 30
        while True:
            tree = tree_cpu_s(parent.pid)
            engine = [cpu for role, cpu in tree.values() if role == "engine"]
            if engine and engine[0] >= 0.5:
                break
            assert time.monotonic() < deadline, tree
            time.sleep(0.1)
        assert tree[parent.pid][0] == "other" and len(tree) >= 2
    finally:
        for pid in tree_cpu_s(parent.pid):
            os.kill(pid, signal.SIGKILL)
        parent.wait()
    before = {1: ("engine", 2.0), 2: ("worker", 1.0), 3: ("worker", 0.0)}
    after = {1: ("engine", 3.0), 2: ("worker", 2.5), 3: ("worker", 1.0), 4: ("other", 0.5)}
    assert per_second(before, after, 2.0) == {
        "engine": 0.5, "workers": 1.25, "worker max": 0.75, "other": 0.25
    }  # fmt: skip
