"""Fixtures of the reliability suite.

- `server`: one real `bentoml serve` on a loopback port (loadtests/server.py) with the service
  tests' settings (tests/service/service_testing.py), max_concurrency 16 and one OpenMP thread
  (load_helpers.py says why); a test that stops it (graceful shutdown) leaves the next one a
  fresh server.
- `client`, `engine`: the service tests' in-process TestClient on the app and its AsyncLLM
  (tests/conftest.py: one app per session).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
for _path in (REPO, REPO / "tests" / "service"):  # loadtests.*, service_testing
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from load_helpers import SERVER_ENV  # noqa: E402

from loadtests.server import BentoServer  # noqa: E402


@pytest.fixture(scope="session")
def _bento_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BentoServer]:
    home = tmp_path_factory.mktemp("bentoml-home")
    srv = BentoServer(home / "serve.log", env=SERVER_ENV, home=home)
    yield srv
    srv.stop()


@pytest.fixture
def server(_bento_server: BentoServer) -> BentoServer:
    """The running server, started (again) if needed."""
    if not _bento_server.running:
        _bento_server.start()
    return _bento_server
