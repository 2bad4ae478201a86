"""Overload: 4x max_concurrency requests at the same instant on a real server. The excess is
shed at once with 429 (the engine never sees it), every admitted request completes, and the
server ends idle and keeps serving."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from load_helpers import (
    CHAT_PATH,
    MAX_CONCURRENCY,
    Outcome,
    chat_body,
    check_sse,
    http_stats,
    wait_idle,
)

from loadtests.server import BentoServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

MAX_TOKENS = 16  # long enough that no admitted request ends before the last one arrives


def one_call(server: BentoServer, i: int, barrier: threading.Barrier) -> Outcome:
    prompt = f"Tell me story number {i}."
    path, body = (
        (CHAT_PATH, chat_body(prompt, MAX_TOKENS, stream=True))
        if i % 2
        else ("/generate", {"prompt": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True})
    )
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=120) as http:
        barrier.wait()
        start = time.monotonic()
        with http.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                r.read()
                return Outcome(r.status_code, r.text, time.monotonic() - start)
            lines = list(r.iter_lines())
        problem = check_sse(lines, MAX_TOKENS) if path == CHAT_PATH else None
        if path == "/generate" and not "".join(lines):
            problem = "empty /generate stream"
        return Outcome(200, problem, time.monotonic() - start)


def test_overload_sheds_the_excess_with_429(server: BentoServer) -> None:
    n = 4 * MAX_CONCURRENCY
    barrier = threading.Barrier(n)
    with ThreadPoolExecutor(n) as pool:
        outcomes = list(pool.map(lambda i: one_call(server, i, barrier), range(n)))
    done = [o for o in outcomes if o.status == 200]
    shed = [o for o in outcomes if o.status == 429]
    assert len(done) + len(shed) == n, sorted({o.status for o in outcomes})
    assert len(done) == MAX_CONCURRENCY, (len(done), len(shed))
    assert not [o.problem for o in done if o.problem]  # every admitted request completed
    assert max(o.latency_s for o in shed) < 2.0  # shed at once ...
    assert max(o.latency_s for o in shed) < min(o.latency_s for o in done)  # ... not queued
    assert all(o.problem for o in shed)  # 429 bodies say why
    stats = wait_idle(lambda: http_stats(server))
    assert (stats["num_running"], stats["num_waiting"], stats["kv_blocks_used"]) == (0, 0, 0)
    r = httpx.post(
        f"{server.url}/complete",
        json={"requests": [{"prompt": "hi", "max_tokens": 2}]},
        headers=server.headers,
        timeout=60,
    )
    assert r.status_code == 200, r.text
