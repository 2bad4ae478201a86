"""Summarize a py-spy raw (collapsed-stack) profile by process role: the top self and
inclusive frames of the engine process, the front ends and the rest. A raw profile of several
processes runs to tens of MB; this summary is what comes back from the device machine.

    py-spy record --subprocesses --nonblocking -r 50 -f raw -o prof.txt -- python ...
    python benchmarks/pyspy_summary.py prof.txt > summary.txt
"""

from __future__ import annotations

import sys
from collections import Counter, defaultdict


def role(frames: list[str]) -> str:
    if any("run_engine_process" in f for f in frames):
        # the step loop apart from start-up (imports, weights, compiles, graph captures)
        loop = any(f.startswith("ServingLoop.run (") for f in frames)
        return "engine step loop" if loop else "engine start-up and exit"
    if any(f.startswith(("front_end (", "streamed (", "AsyncLLM._deliver (")) for f in frames):
        return "front end"
    if any(f.startswith("EngineCore.step (") for f in frames):  # host_step_probe.py
        return "engine step loop"
    return "other"


def main(path: str, top_self: int = 25, top_inclusive: int = 70) -> None:
    samples: dict[str, int] = defaultdict(int)
    own: dict[str, Counter] = defaultdict(Counter)
    inclusive: dict[str, Counter] = defaultdict(Counter)
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            if not stack:
                continue
            frames, n = stack.split(";"), int(count)
            r = role(frames)
            samples[r] += n
            own[r][frames[-1]] += n
            for frame in set(frames[1:]):  # (the first names the process)
                inclusive[r][frame] += n
    for r, total in samples.items():
        print(f"== {r}: {total} samples")
        for frame, n in own[r].most_common(top_self):
            print(f"  self {n / total * 100:5.1f}% {frame[:140]}")
        for frame, n in inclusive[r].most_common(top_inclusive):
            print(f"  incl {n / total * 100:5.1f}% {frame[:140]}")


if __name__ == "__main__":
    main(sys.argv[1])
