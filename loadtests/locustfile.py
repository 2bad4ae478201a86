"""Locust users for the vllm-runner service (docs/serving.md).

    locust -f loadtests/locustfile.py --headless -u 16 -r 4 -t 60s \
        --host http://127.0.0.1:3000 --csv out MixedUser

Users: `ChatUser` (streamed /v1/chat/completions), `GenerateUser` (streamed /generate),
`CompleteUser` (adaptive-batched /complete, one prompt per call so that BentoML batches across
users) and `MixedUser` (all three, 2:2:1). Each request has `max_tokens` output tokens
(`ignore_eos`) and a prompt of mixed length. Besides locust's own entries, each successful
request fires these events (request_type, name = the route):

- `TTFT`: ms from sending to the first token (streams only);
- `ITL`: ms between tokens, one event per chunk after the first (streams only);
- `TOKENS`: response_time = the request's output tokens/s, response_length = its output tokens.

Failures are named by kind so that `run.py` can tell them apart: `5xx ...`, `429 ...`,
`4xx ...`, `in-band error ...` (an error event inside a 200 stream), `transport ...`.

Settings (environment): LOADTEST_API_KEY, LOADTEST_MAX_TOKENS (32), LOADTEST_PROMPT_WORDS
(comma-separated prompt lengths in words, each drawn with +-50% jitter; "8,64,384"),
LOADTEST_SEED (0: with the same seed, the n-th user a locust process starts draws the same
prompts; each process its own),
LOADTEST_BACKOFF_429_S (0.5: how long a user that got a 4xx, 429 included, waits).
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import random
import time
from typing import Any

import requests
from locust import HttpUser, constant, events, task
from locust.runners import MasterRunner, WorkerRunner
from locust.stats import PERCENTILES_TO_REPORT, StatsCSV

MAX_TOKENS = int(os.environ.get("LOADTEST_MAX_TOKENS", "32"))
PROMPT_WORDS = [int(w) for w in os.environ.get("LOADTEST_PROMPT_WORDS", "8,64,384").split(",")]
API_KEY = os.environ.get("LOADTEST_API_KEY", "")
SEED = int(os.environ.get("LOADTEST_SEED", "0"))
# A user that got a 4xx (429 included) waits this long before its next request: without it,
# closed-loop users retry at once and flood the server (and the cores it shares with locust)
# with rejections (a wrong API key: ~1,700 requests a second).
BACKOFF_429_S = float(os.environ.get("LOADTEST_BACKOFF_429_S", "0.5"))
_TEXT = """the a river city light morning quiet engine paper window garden story music winter
market bridge letter mountain station question summer orange careful bright distant small ancient
simple open walk read build carry follow remember listen travel write because while after before
under across between through every each other many"""
WORDS = _TEXT.split()


def failure_kind(status: int) -> str:
    if status == 429:
        return "429"
    return "5xx" if status >= 500 else "4xx"


def refused(resp: Any) -> None:
    """Record a non-200 answer; after a 4xx this user waits before its next request."""
    if resp.status_code == 0:  # locust's stand-in when no answer came (connection refused)
        resp.failure(f"transport {type(resp.error).__name__}: {resp.error}"[:300])
        return
    resp.failure(f"{failure_kind(resp.status_code)} {resp.status_code}: {resp.text[:200]}")
    if 400 <= resp.status_code < 500:
        time.sleep(BACKOFF_429_S)  # gevent-patched: only this user waits


@events.init.add_listener
def _final_csv_at_quit(environment: Any, **_: Any) -> None:
    """Rewrite the --csv files with the final stats when locust quits.

    NOTE: locust rewrites them once a second while it runs and not at exit, so the requests
    that ended in the last second (those the drain, --stop-timeout, waits for; the failures of
    a server that died at the end) were missing from them and from run.py's summary."""
    prefix = getattr(environment.parsed_options, "csv_prefix", None)
    if not prefix or isinstance(environment.runner, WorkerRunner):
        return

    def write(**_: Any) -> None:
        writer = StatsCSV(environment, PERCENTILES_TO_REPORT)
        for suffix, rows in (
            ("stats", writer.requests_csv),
            ("failures", writer.failures_csv),
            ("exceptions", writer.exceptions_csv),
        ):
            with open(f"{prefix}_{suffix}.csv", "w", newline="") as f:
                rows(csv.writer(f))

    environment.events.quit.add_listener(write)  # after the runner stopped, before exit


@events.init.add_listener
def _drain_workers_before_quit(environment: Any, **_: Any) -> None:
    """With --processes, stop the workers (each drains its users) before the master quits.

    NOTE: at the end of -t locust's master quits without stopping its workers and waits 0.5 s
    for their last stats: the requests in flight then, which --stop-timeout should let
    finish, were missing from every statistic. Now the master stops its workers and waits
    until each reports its users stopped; a worker sends its stats just before."""
    runner = environment.runner
    if isinstance(runner, MasterRunner):
        quit_now = runner.quit

        def quit() -> None:
            runner.stop()  # "stop" to every worker, then waits until none has users
            quit_now()

        runner.quit = quit
    elif isinstance(runner, WorkerRunner):

        def stopped(**_: Any) -> None:
            runner._send_stats()  # before it tells the master it stopped
            # NOTE: a stopped worker waits stop_timeout more before it reads its next message:
            # the master's "quit" would find it busy, and it would outlive the master
            environment.stop_timeout = 0

        environment.events.test_stop.add_listener(stopped)


class LLMUser(HttpUser):
    """Shared plumbing: prompts, auth, event reporting."""

    abstract = True
    wait_time = constant(0)  # closed loop: each user sends its next request at once
    _started = itertools.count()  # users in start order: their prompts repeat run to run

    def on_start(self) -> None:
        # NOTE: each locust process (--processes) counts its users from 0: without its index,
        # the n-th users of all processes would send the same prompts (prefix cache hits).
        process = getattr(self.environment.runner, "worker_index", 0)
        self.rng = random.Random(f"{SEED}-{process}-{next(LLMUser._started)}")
        if API_KEY:
            self.client.headers["Authorization"] = f"Bearer {API_KEY}"

    def prompt(self) -> str:
        base = self.rng.choice(PROMPT_WORDS)
        n = max(1, round(base * self.rng.uniform(0.5, 1.5)))
        return "Continue this text: " + " ".join(self.rng.choice(WORDS) for _ in range(n))

    def event(self, kind: str, name: str, value: float, length: int = 0) -> None:
        self.environment.events.request.fire(
            request_type=kind,
            name=name,
            response_time=value,
            response_length=length,
            exception=None,
            context={},
        )

    def report(self, name: str, start: float, times: list[tuple[float, int]], tokens: int) -> None:
        """`times`: (arrival, tokens) of each chunk that carried tokens."""
        end = time.perf_counter()
        if times:
            self.event("TTFT", name, (times[0][0] - start) * 1000)
            for (prev, _), (now, n) in zip(times, times[1:], strict=False):
                self.event("ITL", name, (now - prev) * 1000 / max(n, 1))
        self.event("TOKENS", name, tokens / max(end - start, 1e-9), tokens)

    def stream(
        self, name: str, body: dict[str, Any], parse: Any, tokens: int | None = None
    ) -> None:
        """POST a streamed request; `parse(chunk)` -> (tokens in it, usage or None, error).
        The output tokens are `tokens` if given, else the usage the stream reports."""
        start = time.perf_counter()
        times: list[tuple[float, int]] = []
        usage: int | None = None
        with self.client.post(name, json=body, stream=True, catch_response=True, name=name) as resp:
            if resp.status_code != 200:
                refused(resp)
                return
            try:
                for chunk in resp.iter_content(chunk_size=None):
                    n, chunk_usage, error = parse(chunk)
                    if error:
                        resp.failure(f"in-band error: {error[:200]}")
                        return
                    usage = chunk_usage if chunk_usage is not None else usage
                    if n:
                        times.append((time.perf_counter(), n))
            except requests.RequestException as exc:
                resp.failure(f"transport {type(exc).__name__}: {exc}"[:300])
                return
            if not times:
                resp.failure("stream carried no tokens")
                return
            if not getattr(parse, "complete", lambda: True)():
                resp.failure("stream ended early (no [DONE]): an error after the first chunk")
                return
            # locust timed the request up to the response headers; count the whole stream
            resp.request_meta["response_time"] = (time.perf_counter() - start) * 1000
            resp.request_meta["response_length"] = sum(n for _, n in times)
            resp.success()
        total = tokens if tokens is not None else usage
        self.report(name, start, times, total if total is not None else len(times))


def sse_parser() -> Any:
    """Counts content deltas in SSE chunks (events may span chunks); reads usage and errors."""
    buffer = b""
    done = False

    def parse(chunk: bytes) -> tuple[int, int | None, str | None]:
        nonlocal buffer, done
        buffer += chunk
        *events, buffer = buffer.split(b"\n\n")
        tokens, usage = 0, None
        for event in events:
            data = event.removeprefix(b"data: ").strip()
            if data == b"[DONE]":
                done = True
            if not data or data == b"[DONE]":
                continue
            payload = json.loads(data)
            if "error" in payload:
                return tokens, usage, payload["error"].get("message", str(payload))
            if payload.get("usage"):
                usage = payload["usage"]["completion_tokens"]
            for choice in payload.get("choices", []):
                tokens += bool(choice.get("delta", {}).get("content"))
        return tokens, usage, None

    parse.complete = lambda: done  # type: ignore[attr-defined]
    return parse


def do_chat(user: LLMUser) -> None:
    body = {
        "messages": [{"role": "user", "content": user.prompt()}],
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    user.stream("/v1/chat/completions", body, sse_parser())


def do_generate(user: LLMUser) -> None:
    body = {"prompt": user.prompt(), "max_tokens": MAX_TOKENS, "ignore_eos": True}

    def parse(chunk: bytes) -> tuple[int, int | None, str | None]:
        return (1 if chunk else 0), None, None

    # NOTE: /generate streams bare text deltas (one per engine step, unless the network
    # coalesces them); with ignore_eos every request makes exactly max_tokens tokens.
    user.stream("/generate", body, parse, tokens=MAX_TOKENS)


def do_complete(user: LLMUser) -> None:
    item = {"prompt": user.prompt(), "max_tokens": MAX_TOKENS, "ignore_eos": True}
    start = time.perf_counter()
    with user.client.post(
        "/complete", json={"requests": [item]}, catch_response=True, name="/complete"
    ) as resp:
        if resp.status_code != 200:
            refused(resp)
            return
        (result,) = resp.json()
        if result.get("error") or result.get("finish_reason") == "error":
            resp.failure(f"in-band error: {result.get('error')}"[:300])
            return
        resp.success()
    tokens = result["completion_tokens"]
    user.event("TOKENS", "/complete", tokens / max(time.perf_counter() - start, 1e-9), tokens)


class ChatUser(LLMUser):
    @task
    def chat(self) -> None:
        do_chat(self)


class GenerateUser(LLMUser):
    @task
    def generate(self) -> None:
        do_generate(self)


class CompleteUser(LLMUser):
    @task
    def complete(self) -> None:
        do_complete(self)


class MixedUser(LLMUser):
    tasks = {do_chat: 2, do_generate: 2, do_complete: 1}
