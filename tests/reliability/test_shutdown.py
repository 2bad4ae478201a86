"""Graceful shutdown under load: SIGTERM while streams run on all three streaming routes.
Every stream still ends complete (SSE [DONE], usage, finish reason), new requests are no
longer taken, and the server exits 0. (tests/service/test_serve.py covers one /generate
stream; this runs several routes at once.) It stops the shared server: later tests that need
one get a fresh one."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack

import httpx
import pytest
from load_helpers import CHAT_PATH, chat_body, check_sse, sse_payloads

from loadtests.server import BentoServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

MAX_TOKENS = 24
PROMPT = "Count from one to fifty:"
BODIES = {
    "/generate": {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0},
    CHAT_PATH: chat_body(PROMPT, MAX_TOKENS, stream=True),
    "/v1/completions": {
        "prompt": PROMPT,
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    },
}


def until_first_token(path: str, lines: Iterator[str]) -> list[str]:
    seen = []
    for line in lines:
        seen.append(line)
        if path == "/generate" and line:
            return seen
        payloads, _ = sse_payloads([line])
        choices = [c for p in payloads for c in p.get("choices", [])]
        if any(c.get("text") or c.get("delta", {}).get("content") for c in choices):
            return seen
    raise AssertionError(f"{path} ended before its first token: {seen}")


def refuses_new_requests(server: BentoServer, within_s: float = 5.0) -> bool:
    """True once a new request is refused; any answer before that must not be a 5xx."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            r = httpx.post(f"{server.url}/complete", json={"requests": []}, timeout=5)
        except httpx.TransportError:
            return True
        assert r.status_code < 500, r.text
        time.sleep(0.1)
    return False


def test_sigterm_lets_streams_in_flight_finish(server: BentoServer) -> None:
    # the whole greedy text, to compare the interrupted stream with (lines: newlines dropped)
    whole = httpx.post(
        f"{server.url}/generate", json=BODIES["/generate"], headers=server.headers, timeout=60
    )
    assert whole.status_code == 200, whole.text
    received: dict[str, list[str]] = {}
    with ExitStack() as stack:
        streams = {}
        for path, body in BODIES.items():
            http = stack.enter_context(
                httpx.Client(base_url=server.url, headers=server.headers, timeout=60)
            )
            response = stack.enter_context(http.stream("POST", path, json=body))
            assert response.status_code == 200
            # NOTE: keep the iterator: dropping it would close the connection now
            streams[path] = response.iter_lines()
            received[path] = until_first_token(path, streams[path])
        server.proc.send_signal(signal.SIGTERM)
        assert refuses_new_requests(server)
        for path, lines in streams.items():
            received[path] += list(lines)
    # (was: >= MAX_TOKENS characters, which sampled newline tokens, dropped by the line
    # split, could undercut)
    assert "".join(received["/generate"]) == "".join(re.split(r"\r\n|\r|\n", whole.text))
    for path in (CHAT_PATH, "/v1/completions"):
        assert check_sse(received[path], MAX_TOKENS) is None, received[path][-3:]
    assert server.proc.wait(timeout=60) == 0, server.logs()
