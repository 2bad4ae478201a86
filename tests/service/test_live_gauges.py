"""live_gauges: which processes count as dead, and which requests forget their gauges."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vllm_runner.serving import live_gauges
from vllm_runner.serving.live_gauges import LiveGaugesMiddleware, _alive


def _exited_child() -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child


def test_a_killed_process_not_yet_reaped_is_dead() -> None:
    """A worker killed but not yet waited for by its parent is a zombie: os.kill(pid, 0)
    still succeeds, yet its gauges are stale."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        stat = Path(f"/proc/{child.pid}/stat")
        for _ in range(500):  # (its exit, unreaped: poll() or wait() would reap it)
            if stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
                break
            time.sleep(0.01)
        assert _alive(child.pid) is False
    finally:
        child.wait()
    assert _alive(child.pid) is False  # reaped: gone


def test_another_users_process_is_alive(monkeypatch) -> None:
    def kill(pid: int, sig: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "kill", kill)
    assert _alive(12345) is True


@pytest.mark.parametrize(
    ("stat", "alive"),
    [
        ("12345 (python) S 1 2 3", True),
        ("12345 (a) Z (b) S 1 2 3", True),  # a name holding ") Z (": its state is S
        ("12345 (a) S (b) Z 1 2 3", False),
        ("12345 (python) X 1 2 3", False),
    ],
)
def test_the_state_is_read_after_the_last_parenthesis(monkeypatch, stat, alive) -> None:
    monkeypatch.setattr(os, "kill", lambda pid, sig: None)
    monkeypatch.setattr(live_gauges, "open", lambda path: io.StringIO(stat), raising=False)
    assert _alive(12345) is alive


def test_a_process_that_answers_is_alive_without_proc(monkeypatch) -> None:
    def no_proc(path: str) -> None:
        raise FileNotFoundError(path)

    monkeypatch.setattr(os, "kill", lambda pid, sig: None)
    monkeypatch.setattr(live_gauges, "open", no_proc, raising=False)
    assert _alive(12345) is True


def _through_middleware(scope: dict) -> list[dict]:
    seen = []

    async def app(scope: dict, receive: object, send: object) -> None:
        seen.append(scope)

    asyncio.run(LiveGaugesMiddleware(app)(scope, None, None))
    return seen


@pytest.mark.parametrize(
    ("scope", "forgets"),
    [
        ({"type": "http", "path": "/metrics"}, True),
        ({"type": "http", "path": "/metrics/"}, True),
        ({"type": "http", "path": "/v1/models"}, False),
        ({"type": "lifespan"}, False),  # (no path: start-up and shutdown pass through)
    ],
)
def test_metrics_scrapes_forget_dead_gauges_and_all_requests_pass(
    tmp_path, monkeypatch, scope, forgets
) -> None:
    dead = tmp_path / f"gauge_livesum_{_exited_child().pid}.db"
    dead.touch()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    assert _through_middleware(scope) == [scope]
    assert dead.exists() is not forgets


def test_without_a_multiprocess_dir_nothing_is_removed(tmp_path, monkeypatch) -> None:
    dead = tmp_path / f"gauge_livesum_{_exited_child().pid}.db"
    dead.touch()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    scope = {"type": "http", "path": "/metrics"}
    assert _through_middleware(scope) == [scope]
    assert dead.exists()


def test_only_live_gauges_of_dead_processes_are_forgotten(tmp_path) -> None:
    """As prometheus_client's mark_process_dead: "all"-mode gauges (one series a pid),
    counters and histograms of a dead process stay, as do a live process's live gauges."""
    dead, alive = _exited_child().pid, os.getpid()
    names = [f"gauge_livesum_{dead}.db", f"gauge_livemax_{dead}.db", f"gauge_all_{dead}.db",
             f"counter_{dead}.db", f"histogram_{dead}.db", f"gauge_livesum_{alive}.db"]  # fmt: skip
    for name in names:
        (tmp_path / name).touch()
    live_gauges.forget_dead_processes(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])
