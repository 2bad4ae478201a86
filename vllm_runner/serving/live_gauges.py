"""/metrics without the gauges of dead workers.

prometheus_client's live gauges ("livesum", "livemax": the engine's) sum the files of every
process that wrote them until that process is marked dead, which BentoML does only for a
worker that exits cleanly. A worker killed (SIGKILL, out of memory, a crash) and respawned
left its last values in the sums: a shared engine's KV blocks counted twice.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any

_LIVE_GAUGE_FILE = re.compile(r"gauge_live[a-z]+_(\d+)\.db")


def forget_dead_processes(path: str) -> None:
    """Drop the live gauges of the processes gone from the multiprocess directory ``path``
    (their counters and histograms stay: what they counted happened). What
    prometheus_client's ``mark_process_dead`` does, but a file another worker's scrape
    removed first is no error (that scrape answered 500)."""
    dead: dict[int, bool] = {}
    for name in os.listdir(path):
        if m := _LIVE_GAUGE_FILE.fullmatch(name):
            pid = int(m[1])
            if dead.setdefault(pid, not _alive(pid)):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(path, name))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # (another user's: alive)
        return True
    try:  # killed but not yet reaped: a zombie (state Z)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):  # (no /proc)
        return True


class LiveGaugesMiddleware:
    """ASGI middleware: before each /metrics scrape, forgets the dead workers' gauges."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if path and scope["type"] == "http" and scope["path"].rstrip("/") == "/metrics":
            forget_dead_processes(path)
        await self.app(scope, receive, send)
