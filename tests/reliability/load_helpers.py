"""Request builders and response checks shared by the reliability tests (httpx, real sockets)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx
from service_testing import SERVICE_ENV

from loadtests.server import BentoServer

CHAT_PATH = "/v1/chat/completions"
SSE_PATHS = (CHAT_PATH, "/v1/completions")
MAX_CONCURRENCY = 16
# The service tests' settings (default model, CPU, max_model_len 256, API key), and one
# OpenMP thread. NOTE: with torch's default (a thread per core), on a 2-core machine that other
# work shares, the engine's pair of threads meets at a barrier in every GEMM and waits there
# for a descheduled peer: 16 prompts x 8 tokens went from 0.6 s to 4-21 s under load (one
# thread: 0.55-0.75 s), and test_mixed_load ran past its timeout. The checks do not change.
SERVER_ENV = {
    **SERVICE_ENV,
    "VLLM_RUNNER_MAX_CONCURRENCY": str(MAX_CONCURRENCY),
    "OMP_NUM_THREADS": "1",
}


def http_stats(server: BentoServer) -> dict[str, int]:
    return httpx.get(f"{server.url}/stats", headers=server.headers, timeout=10).json()


def wait_idle(get_stats: Callable[[], dict[str, int]], timeout: float = 30.0) -> dict[str, int]:
    """Poll `get_stats()` until no request runs or waits and no KV block is used."""
    deadline = time.monotonic() + timeout
    while True:
        stats = get_stats()
        idle = stats["num_running"] == stats["num_waiting"] == stats["kv_blocks_used"] == 0
        if idle or time.monotonic() > deadline:
            return stats
        time.sleep(0.2)


def chat_body(text: str, max_tokens: int, stream: bool, **extra: Any) -> dict[str, Any]:
    body = {
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
        **extra,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def sse_payloads(lines: Iterable[str]) -> tuple[list[dict[str, Any]], bool]:
    """The JSON `data:` payloads of an SSE body, and whether it ended with `data: [DONE]`."""
    payloads, done = [], False
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[len("data: ") :]
        if data == "[DONE]":
            done = True
        else:
            payloads.append(json.loads(data))
    return payloads, done


@dataclass
class Outcome:
    """What one call got back; `problem` is None when it behaved as it should."""

    status: int
    problem: str | None = None
    latency_s: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


def check_sse(lines: Iterable[str], max_tokens: int) -> str | None:
    """A complete OpenAI stream: no error event, [DONE], usage == max_tokens (ignore_eos)."""
    payloads, done = sse_payloads(lines)
    errors = [p["error"] for p in payloads if "error" in p]
    if errors:
        return f"in-band error: {errors[0]}"
    if not done:
        return "stream ended without [DONE]"
    usage = [p["usage"] for p in payloads if p.get("usage")]
    if not usage or usage[-1]["completion_tokens"] != max_tokens:
        return f"usage {usage[-1:]} != {max_tokens} tokens"
    finishes = [c["finish_reason"] for p in payloads for c in p["choices"] if c["finish_reason"]]
    if finishes != ["length"]:
        return f"finish reasons {finishes}"
    return None


def sse_text(line: str) -> bool:
    """Whether an SSE line carries generated text (a completion's or a chat delta's)."""
    payloads, _ = sse_payloads([line])
    choices = [c for p in payloads for c in p.get("choices", [])]
    return any(c.get("text") or c.get("delta", {}).get("content") for c in choices)


def first_token_then_close(http: httpx.Client, path: str, body: dict[str, Any]) -> Outcome:
    """Open a stream, wait for its first generated text, then drop the connection."""
    with http.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            r.read()
            return Outcome(r.status_code, f"stream refused: {r.status_code} {r.text[:200]}")
        # NOTE: /generate streams bare text, no newlines: waiting there for a line would read
        # the whole stream (a full generation, and no client ever leaving mid-stream).
        pieces = r.iter_lines() if path in SSE_PATHS else r.iter_text()
        if not any(sse_text(piece) if path in SSE_PATHS else piece for piece in pieces):
            return Outcome(200, "the stream ended before the client left")
    return Outcome(200)  # leaving the block closes the connection mid-stream


def error_message(response: httpx.Response) -> str:
    """The error message of a 4xx answer: OpenAI `error.message` or BentoML `error` (+detail)."""
    try:
        body = response.json()
    except ValueError:
        return ""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or "")
    if isinstance(error, str):
        return f"{error} {json.dumps(body.get('detail', ''))}"
    return ""


def server_errors(log: str) -> list[str]:
    """Exceptions in a server log other than the validation errors of bad requests (BentoML
    logs those too), and streams it cut short after an exception."""
    found = [
        line
        for line in log.splitlines()
        if re.match(r"[\w.]+(Error|Exception)\b", line) and "ValidationError" not in line
    ]
    return found + [line for line in log.splitlines() if "Error while streaming" in line]
