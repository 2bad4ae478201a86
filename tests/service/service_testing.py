"""Constants and helpers shared by the service tests (fixtures are in conftest.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_MODEL_LEN = 256
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
SERVICE_ENV = {
    "VLLM_RUNNER_DTYPE": "float32",
    "VLLM_RUNNER_DEVICE": "cpu",
    "VLLM_RUNNER_MAX_MODEL_LEN": str(MAX_MODEL_LEN),
    "VLLM_RUNNER_MAX_NUM_SEQS": "16",
    "VLLM_RUNNER_CPU_KV_CACHE_GB": "0.25",
    "VLLM_RUNNER_API_KEY": API_KEY,
    "VLLM_RUNNER_MAX_CONCURRENCY": "32",
    "VLLM_RUNNER_MAX_BATCH_SIZE": "16",
}
READY_TIMEOUT_S = 180


def receive_then_leave(body: bytes, leave: Any) -> Any:
    """An ASGI receive that gives the request ``body``, then a disconnect once ``leave`` (an
    asyncio.Event) is set."""
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        if messages:
            return messages.pop()
        await leave.wait()
        return {"type": "http.disconnect"}

    return receive


def post_scope(path: str) -> dict:
    """The ASGI scope of an authorised JSON POST to ``path`` (for tests that drive the app's
    receive / send themselves, e.g. to disconnect mid-request)."""
    headers = [(b"authorization", f"Bearer {API_KEY}".encode()),
               (b"content-type", b"application/json")]  # fmt: skip
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
            "root_path": "", "query_string": b"", "headers": headers,
            "client": ("127.0.0.1", 1234), "server": ("127.0.0.1", 80)}  # fmt: skip


def wait_ready(probe: Any, timeout: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        try:
            status = probe()
        except Exception as exc:  # server not listening yet
            status = repr(exc)
        if status == 200:
            return
        time.sleep(0.2)
    raise TimeoutError(f"/readyz not 200 after {timeout}s (last: {status})")


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples named `name` whose labels include `labels` in Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    total, found = 0.0, False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
                found = True
    if not found:
        raise KeyError(f"{name}{labels or ''} not in the metrics")
    return total
