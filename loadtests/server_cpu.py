"""CPU time of a server's processes (Linux /proc): which of them bounds a load step.

A worker near one CPU second per second is held by its own event loop (one GIL); the
engine process near one, by its step loop; all of them together near the machine's cores,
by the machine.
"""

from __future__ import annotations

import os
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds) of a live process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / TICKS  # ppid, utime + stime


def _role(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return "other"
    if "spawn_main" in cmd:  # (multiprocessing's spawn: the engine process)
        return "engine"
    if "_bentoml_impl.worker" in cmd:
        return "worker"
    return "other"


def tree_cpu_s(root: int) -> dict[int, tuple[str, float]]:
    """pid -> (role, CPU seconds so far) of ``root`` and its live descendants."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            stats[int(entry.name)] = st
    inside, grew = {root}, True
    while grew:
        more = {pid for pid, (ppid, _) in stats.items() if ppid in inside} - inside
        inside |= more
        grew = bool(more)
    return {pid: (_role(pid), stats[pid][1]) for pid in inside if pid in stats}


def per_second(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], wall: float
) -> dict[str, float]:
    """CPU seconds per second of the step: the engine process, the workers together, the
    busiest worker, the rest (the server's parent and helpers)."""
    used: dict[int, tuple[str, float]] = {}
    for pid, (role, cpu) in after.items():
        used[pid] = (role, (cpu - before.get(pid, (role, 0.0))[1]) / wall)
    workers = [u for role, u in used.values() if role == "worker"]
    return {
        "engine": round(sum(u for role, u in used.values() if role == "engine"), 2),
        "workers": round(sum(workers), 2),
        "worker max": round(max(workers, default=0.0), 2),
        "other": round(sum(u for role, u in used.values() if role == "other"), 2),
    }
