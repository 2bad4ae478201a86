"""Reads locust's CSVs of one sweep step, checks SLOs, writes the summary and the plots."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

from loadtests.plot import PALETTE, Series, line_plot

STREAM_ROUTES = ("/v1/chat/completions", "/generate")
ALL_ROUTES = (*STREAM_ROUTES, "/complete")
# Failure kinds (the prefix locustfile.py gives each failure) that fail the run.
FATAL_KINDS = ("5xx", "4xx", "in-band", "transport", "stream", "exception")
SERVER_CPU_KEYS = ("engine", "workers", "worker max", "other")  # server_cpu.per_second
# locust writes a failure as the repr of its exception: CatchResponseError('5xx 500: ...')
_WRAPPED = re.compile(r"""^\w+\((['"])(.*)\1\)$""", re.S)


@dataclass
class Step:
    """One sweep step: `users` closed-loop users for a bounded time."""

    users: int
    requests: int = 0  # HTTP requests locust completed (all routes)
    requests_per_s: float = 0.0
    output_tokens: int = 0
    tokens_per_s: float = 0.0  # output tokens of completed requests / locust's elapsed time
    server_tokens_per_s: float | None = None  # engine's generation_tokens_total delta / wall time
    failures: dict[str, int] = field(default_factory=dict)  # kind -> count
    errors: list[str] = field(default_factory=list)  # distinct messages, for the summary
    ttft_ms: dict[str, tuple[float, float]] = field(default_factory=dict)  # route -> (p50, p99)
    itl_ms: dict[str, tuple[float, float]] = field(default_factory=dict)
    itl_max_ms: float = 0.0  # the longest stall of any stream
    complete_ms: tuple[float, float] | None = None  # /complete latency p50, p99
    route_tokens_per_s: dict[str, float] = field(default_factory=dict)  # mean per request
    client_cpu_per_s: float = 0.0  # locust's CPU seconds per second of the step
    # a server started by run.py: its processes' CPU s/s (server_cpu.per_second's keys)
    server_cpu_per_s: dict[str, float] = field(default_factory=dict)

    @property
    def fatal(self) -> int:
        return sum(n for kind, n in self.failures.items() if kind in FATAL_KINDS)


def _rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _num(row: dict[str, str], key: str) -> float:
    value = row.get(key, "") or "0"
    return float("nan") if value == "N/A" else float(value)


def read_step(users: int, prefix: Path) -> Step:
    """Parse `{prefix}_stats.csv`, `_failures.csv` and `_exceptions.csv` of one locust run."""
    step = Step(users)
    for row in _rows(Path(f"{prefix}_stats.csv")):
        kind, name = row["Type"], row["Name"]
        count = int(_num(row, "Request Count"))
        p50, p99 = _num(row, "50%"), _num(row, "99%")
        if kind == "TTFT":
            step.ttft_ms[name] = (p50, p99)
        elif kind == "ITL":
            step.itl_ms[name] = (p50, p99)
            step.itl_max_ms = max(step.itl_max_ms, _num(row, "Max Response Time"))
        elif kind == "TOKENS":
            # NOTE: content sizes and averages are exact; locust rounds the percentiles
            tokens = round(count * _num(row, "Average Content Size"))
            step.output_tokens += tokens
            step.tokens_per_s += _num(row, "Requests/s") * _num(row, "Average Content Size")
            step.route_tokens_per_s[name] = _num(row, "Average Response Time")
        elif kind in ("GET", "POST"):
            step.requests += count
            step.requests_per_s += _num(row, "Requests/s")
            if name == "/complete":  # not streamed: locust's time is the whole request
                step.complete_ms = (p50, p99)
    for row in _rows(Path(f"{prefix}_failures.csv")):
        error = row["Error"]
        if m := _WRAPPED.match(error):
            error = m.group(2)
        kind = error.split(" ", 1)[0].split(":", 1)[0]
        kind = kind if kind in ("429", "4xx", *FATAL_KINDS) else "other"
        step.failures[kind] = step.failures.get(kind, 0) + int(row["Occurrences"])
        step.errors.append(f"{row['Name']}: {error}")
    for row in _rows(Path(f"{prefix}_exceptions.csv")):
        step.failures["exception"] = step.failures.get("exception", 0) + int(row["Count"])
        step.errors.append(f"exception: {row['Message']}")
    return step


@dataclass(frozen=True)
class Slo:
    ttft_p99_ms: float | None = None
    itl_p99_ms: float | None = None
    min_tokens_per_s: float | None = None

    def misses(self, step: Step) -> list[str]:
        out = []
        for route, (_, p99) in step.ttft_ms.items():
            if self.ttft_p99_ms is not None and not p99 <= self.ttft_p99_ms:
                out.append(
                    f"{step.users} users: {route} TTFT p99 {p99:g} > {self.ttft_p99_ms:g} ms"
                )
        for route, (_, p99) in step.itl_ms.items():
            if self.itl_p99_ms is not None and not p99 <= self.itl_p99_ms:
                out.append(f"{step.users} users: {route} ITL p99 {p99:g} > {self.itl_p99_ms:g} ms")
        if self.min_tokens_per_s is not None and not step.tokens_per_s >= self.min_tokens_per_s:
            out.append(
                f"{step.users} users: {step.tokens_per_s:.1f} output tok/s "
                f"< {self.min_tokens_per_s:g}"
            )
        return out


def _pair(values: dict[str, tuple[float, float]], route: str) -> str:
    if route not in values:
        return "-"
    p50, p99 = values[route]
    return f"{p50:g} / {p99:g}"


def summary_markdown(steps: list[Step], header: list[str], verdict: list[str]) -> str:
    routes = [r for r in STREAM_ROUTES if any(r in s.ttft_ms for s in steps)]
    cols = ["users", "req/s", "output tok/s", "engine tok/s", "locust CPU s/s"]
    cols.append("server CPU s/s: engine / workers (busiest) / other")
    cols += [f"TTFT p50/p99 ms {r}" for r in routes] + [f"ITL p50/p99 ms {r}" for r in routes]
    cols += ["ITL max ms", "/complete p50/p99 ms", "fatal", "429", "other 4xx"]
    lines = [*header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for s in steps:
        engine = "-" if s.server_tokens_per_s is None else f"{s.server_tokens_per_s:.1f}"
        cells = [str(s.users), f"{s.requests_per_s:.2f}", f"{s.tokens_per_s:.1f}", engine]
        cells.append(f"{s.client_cpu_per_s:.2f}")
        cpu = s.server_cpu_per_s
        cells.append(
            f"{cpu['engine']:.2f} / {cpu['workers']:.2f} ({cpu['worker max']:.2f}) / "
            f"{cpu['other']:.2f}"
            if cpu
            else "-"
        )
        cells += [_pair(s.ttft_ms, r) for r in routes] + [_pair(s.itl_ms, r) for r in routes]
        done = _pair({"c": s.complete_ms}, "c") if s.complete_ms else "-"
        cells += [
            f"{s.itl_max_ms:.0f}",
            done,
            str(s.fatal),
            str(s.failures.get("429", 0)),
            str(s.failures.get("4xx", 0)),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    errors = [f"- {s.users} users: {e}" for s in steps for e in s.errors[:5]]
    if errors:
        lines += ["", "Failures (first five distinct per step):", *errors]
    lines += ["", *verdict]
    return "\n".join(lines) + "\n"


def write_summary_csv(steps: list[Step], path: Path) -> None:
    routes = STREAM_ROUTES
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        head = ["users", "requests", "requests_per_s", "output_tokens", "output_tokens_per_s"]
        head += ["engine_tokens_per_s", "fatal_failures", "http_429", "http_4xx", "itl_max_ms"]
        head += ["complete_p50_ms", "complete_p99_ms"]
        for r in routes:
            head += [f"ttft_p50_ms {r}", f"ttft_p99_ms {r}", f"itl_p50_ms {r}", f"itl_p99_ms {r}"]
        head += [f"mean_request_tokens_per_s {r}" for r in ALL_ROUTES]
        head.append("client_cpu_per_s")
        head += [f"server_cpu_per_s {k}" for k in SERVER_CPU_KEYS]
        w.writerow(head)
        for s in steps:
            row: list[object] = [s.users, s.requests, round(s.requests_per_s, 3), s.output_tokens]
            row += [round(s.tokens_per_s, 2), s.server_tokens_per_s, s.fatal]
            row += [s.failures.get("429", 0), s.failures.get("4xx", 0), s.itl_max_ms]
            row += list(s.complete_ms or ("", ""))
            for r in routes:
                row += [*s.ttft_ms.get(r, ("", "")), *s.itl_ms.get(r, ("", ""))]
            row += [_round(s.route_tokens_per_s.get(r)) for r in ALL_ROUTES]
            row.append(s.client_cpu_per_s)
            row += [s.server_cpu_per_s.get(k, "") for k in SERVER_CPU_KEYS]
            w.writerow(row)


def _round(value: float | None) -> float | str:
    return "" if value is None else round(value, 3)


def write_plots(steps: list[Step], out: Path, where: str) -> list[Path]:
    xs = [s.users for s in steps]
    where = f" ({where})" if where else ""
    paths = [out / "throughput.png", out / "ttft.png", out / "itl.png"]
    line_plot(
        paths[0],
        f"OUTPUT THROUGHPUT VS USERS{where}",
        "CONCURRENT USERS",
        "TOKENS/S",
        xs,
        [
            Series("client tok/s", [s.tokens_per_s for s in steps], PALETTE[0]),
            Series("engine tok/s", [s.server_tokens_per_s for s in steps], PALETTE[2], True),
        ],
    )
    for path, title, attr in ((paths[1], "TTFT", "ttft_ms"), (paths[2], "ITL", "itl_ms")):
        series = []
        for k, route in enumerate(STREAM_ROUTES):
            values = [getattr(s, attr).get(route) for s in steps]
            if not any(values):
                continue
            short = "chat" if "chat" in route else route.strip("/")
            for q, dashed in ((0, False), (1, True)):
                label = f"{short} p{50 if q == 0 else 99}"
                points = [v[q] if v else None for v in values]
                series.append(Series(label, points, PALETTE[k * 2 + q], dashed))
        line_plot(path, f"{title} P50/P99 VS USERS{where}", "CONCURRENT USERS", "MS", xs, series)
    return paths
