"""Fixtures for the service tests: the BentoML app in-process, built once per session.

The in-process service runs the default model on CPU in float32 with a short context so
that the too-long-prompt cases stay cheap.
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
from service_testing import AUTH, REPO, SERVICE_ENV, wait_ready

# NOTE: prometheus_client reads this once, when first imported; BentoML's /metrics hangs
# without it. Set before anything imports prometheus_client (bentoml, vllm_runner.metrics).
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="vllm-runner-prom-"))


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
