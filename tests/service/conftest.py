"""Fixtures for the service tests: the BentoML app in-process, built once per session.

The in-process service runs the default model on CPU in float32 with a short context so
that the too-long-prompt cases stay cheap.
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

# NOTE: prometheus_client reads this once, when first imported; BentoML's /metrics hangs
# without it. Set before anything imports prometheus_client (bentoml, vllm_runner.metrics).
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="vllm-runner-prom-"))

REPO = Path(__file__).resolve().parents[2]
API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_MODEL_LEN = 256
SERVICE_ENV = {
    "VLLM_RUNNER_DTYPE": "float32",
    "VLLM_RUNNER_DEVICE": "cpu",
    "VLLM_RUNNER_MAX_MODEL_LEN": str(MAX_MODEL_LEN),
    "VLLM_RUNNER_MAX_NUM_SEQS": "16",
    "VLLM_RUNNER_API_KEY": API_KEY,
    "VLLM_RUNNER_MAX_CONCURRENCY": "32",
    "VLLM_RUNNER_MAX_BATCH_SIZE": "16",
}
READY_TIMEOUT_S = 180


@pytest.fixture(scope="session")
def service_module() -> Iterator[ModuleType]:
    """`service.py`, imported with SERVICE_ENV (settings are read at import time)."""
    saved = {k: os.environ.get(k) for k in SERVICE_ENV}
    os.environ.update(SERVICE_ENV)
    sys.path.insert(0, str(REPO))
    try:
        module = importlib.import_module("service")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    yield module


@pytest.fixture(scope="session")
def client(service_module: ModuleType) -> Iterator[Any]:
    """A TestClient on the service's ASGI app, entered (startup hooks run), model loaded."""
    from starlette.testclient import TestClient

    with TestClient(service_module.LLMService.to_asgi(), headers=AUTH) as c:
        wait_ready(lambda: c.get("/readyz").status_code)
        yield c


@pytest.fixture(scope="session")
def engine(client: Any) -> Any:
    """The AsyncLLM of the in-process service (its methods run on the app's event loop)."""
    import bentoml

    return bentoml.get_current_service().engine


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
