"""Sweep locust over user counts against the service; write CSVs, a summary and plots.

    python -m loadtests.run                                  # starts `bentoml serve` (CPU)
    python -m loadtests.run --host http://127.0.0.1:3000 --api-key KEY --users 1,8,32
    python -m loadtests.run --slo-ttft-p99-ms 5000 --slo-itl-p99-ms 500

Each step runs `--duration` seconds of closed-loop users (locustfile.py; MixedUser by default),
then lets in-flight requests finish (`--stop-timeout`). Writes into --out: `u{N}_*.csv` (locust),
`summary.csv`, `summary.md`, `throughput.png`, `ttft.png`, `itl.png`, and the logs.
Exit status: 0; 1 when a request failed with a 5xx or a 4xx other than 429, a broken or
in-band-error stream or a transport error, or an SLO was missed; 2 on bad arguments (e.g. a
host that is not loopback).
"""

from __future__ import annotations

import argparse
import ast
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from loadtests.report import Slo, Step, read_step, summary_markdown, write_plots, write_summary_csv
from loadtests.server import REPO, BentoServer, require_loopback
from loadtests.server_cpu import per_second, tree_cpu_s

LOCUSTFILE = Path(__file__).resolve().with_name("locustfile.py")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--host", help="a running service (loopback only); default: start one")
    p.add_argument("--api-key", default=os.environ.get("VLLM_RUNNER_API_KEY", ""))
    p.add_argument("--users", default="1,4,16,64", help="comma-separated user counts")
    # NOTE: whole seconds: locust's -t and --stop-timeout take no fractions (and -t 0s runs
    # without end)
    p.add_argument("--duration", type=int, default=60, help="seconds of load per step")
    p.add_argument("--stop-timeout", type=int, default=60, help="drain time per step (s)")
    p.add_argument("--user-class", default="MixedUser", help="locustfile class(es), comma-sep.")
    p.add_argument("--max-tokens", type=int, default=32, help="output tokens per request")
    p.add_argument("--prompt-words", default="8,64,384", help="prompt lengths mixed (words)")
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="locust processes (its --processes): one Python process parses a few thousand "
        "chunks a second, so many fast streams need several",
    )
    p.add_argument("--out", type=Path, default=REPO / "loadtests" / "results" / "latest")
    p.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="passed to `bentoml serve --arg` when the service is started here",
    )
    p.add_argument("--label", help="plot title suffix (default: CPU when started here)")
    p.add_argument("--slo-ttft-p99-ms", type=float)
    p.add_argument("--slo-itl-p99-ms", type=float)
    p.add_argument("--slo-min-tokens-per-s", type=float, help="output tok/s at every step")
    args = p.parse_args(argv)
    try:
        args.users = [int(u) for u in args.users.split(",")]
        if not args.users or min(args.users) < 1:
            raise ValueError
    except ValueError:
        p.error(f"--users must be positive integers, got {args.users!r}")
    if args.duration < 1:
        p.error(f"--duration must be at least 1 second, got {args.duration}")
    if args.stop_timeout < 0:
        p.error(f"--stop-timeout must be 0 or more seconds, got {args.stop_timeout}")
    if args.max_tokens < 1:
        p.error(f"--max-tokens must be at least 1, got {args.max_tokens}")
    try:
        if min(int(w) for w in args.prompt_words.split(",")) < 1:
            raise ValueError
    except ValueError:
        p.error(f"--prompt-words must be positive integers, got {args.prompt_words!r}")
    known = user_classes()
    for name in args.user_class.split(","):
        if name not in known:
            p.error(f"--user-class: unknown {name!r} (locustfile.py has {', '.join(known)})")
    if args.processes < 1:
        p.error(f"--processes must be at least 1, got {args.processes}")
    if args.host:
        try:
            args.host = require_loopback(args.host)
        except ValueError as exc:
            p.error(str(exc))
    if any("=" not in a for a in args.serve_arg):
        p.error(f"--serve-arg takes NAME=VALUE, got {args.serve_arg}")
    return args


def user_classes() -> list[str]:
    """The user classes of locustfile.py, read (importing it would import locust, which
    patches this process with gevent)."""
    tree = ast.parse(LOCUSTFILE.read_text())
    return [
        node.name
        for node in tree.body
        if isinstance(node, ast.ClassDef)
        and any(isinstance(base, ast.Name) and base.id == "LLMUser" for base in node.bases)
    ]


def engine_tokens(url: str, headers: dict[str, str]) -> float | None:
    """The engines' generated tokens so far, or None if unavailable: the sum of /metrics'
    generation_tokens_total over the workers. (GET /stats answers for the one worker that
    takes it: with an engine per worker, "before" and "after" could be two engines'.)"""
    request = urllib.request.Request(f"{url}/metrics", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            families = list(text_string_to_metric_families(r.read().decode()))
    except (OSError, ValueError):
        return None
    counts = [
        sample.value
        for family in families
        for sample in family.samples
        if sample.name == "vllm_runner_generation_tokens_total"
    ]
    return sum(counts) if counts else None


def run_step(args: argparse.Namespace, url: str, users: int, server_pid: int | None) -> Step:
    """``server_pid``: a server started here, whose processes' CPU the step reports."""
    prefix = args.out / f"u{users}"
    spawn_rate = max(1.0, users / 2)  # every user within ~2 s
    cmd = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "-u", str(users), "-r", f"{spawn_rate:g}", "-t", f"{args.duration}s",
        "--stop-timeout", str(args.stop_timeout), "--host", url, "--csv", str(prefix),
        "--only-summary", "--exit-code-on-error", "0",
        *(["--processes", str(args.processes)] if args.processes > 1 else []),
        *args.user_class.split(","),
    ]  # fmt: skip
    env = {
        **os.environ,
        "LOADTEST_API_KEY": args.api_key,
        "LOADTEST_MAX_TOKENS": str(args.max_tokens),
        "LOADTEST_PROMPT_WORDS": args.prompt_words,
    }
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    before, start = engine_tokens(url, headers), time.monotonic()
    cpu_before = _children_cpu_s()
    server_before = tree_cpu_s(server_pid) if server_pid else {}
    with open(f"{prefix}.log", "wb") as log:
        rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall, after = time.monotonic() - start, engine_tokens(url, headers)
    step = read_step(users, prefix)
    step.client_cpu_per_s = round((_children_cpu_s() - cpu_before) / wall, 2)
    if server_pid:
        step.server_cpu_per_s = per_second(server_before, tree_cpu_s(server_pid), wall)
    if rc != 0:
        step.failures["exception"] = step.failures.get("exception", 0) + 1
        step.errors.append(f"locust exited with {rc} (see {prefix}.log)")
    if before is not None and after is not None:
        step.server_tokens_per_s = round((after - before) / wall, 2)
    return step


def _children_cpu_s() -> float:
    """CPU seconds of the finished locust processes (a client near one core per process is
    the limit, not the service)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def describe(args: argparse.Namespace, argv: list[str]) -> list[str]:
    cmd = "python -m loadtests.run " + shlex.join(argv)
    serve = " ".join(["bentoml serve", *(f"--arg {a}" for a in args.serve_arg)])
    host = args.host or f"`{serve}` started by run.py (on CPU unless an --arg sets device)"
    return [
        "# Load test summary",
        "",
        f"- command: `{cmd.strip()}`",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}; machine: {platform.node()}, "
        f"{os.cpu_count()} CPUs, {platform.machine()}",
        f"- service: {host}",
        f"- users: {args.user_class} in {args.processes} locust process(es), "
        f"{args.duration:g} s per step (+ drain), "
        f"{args.max_tokens} output tokens per request (ignore_eos), prompts ~{args.prompt_words} "
        "words",
        "- TTFT/ITL: locust percentiles of the custom events (ms; locust rounds values over "
        "100 to 2 significant digits); output tok/s: tokens of completed requests / elapsed; "
        "engine tok/s: the engine's generated tokens / wall time of the step",
    ]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    server = None
    if args.host:
        url = args.host
    else:
        env = {"VLLM_RUNNER_DEVICE": "cpu", "VLLM_RUNNER_API_KEY": args.api_key}
        serve_args = dict(a.split("=", 1) for a in args.serve_arg)
        # its own BENTOML_HOME: each `bentoml serve` empties $BENTOML_HOME/prometheus_multiproc_dir
        # at start, which would wipe the /metrics of another server running under the same home
        server = BentoServer(
            args.out / "server.log", env=env, args=serve_args, home=args.out / "bentoml_home"
        )
        print(f"starting bentoml serve (log: {server.log}) ...", flush=True)
        url = server.start().url
    steps: list[Step] = []
    try:
        for users in args.users:
            print(f"{users} users for {args.duration:g}s ...", flush=True)
            steps.append(run_step(args, url, users, server.proc.pid if server else None))
            s = steps[-1]
            print(
                f"  {s.requests} requests, {s.tokens_per_s:.1f} tok/s, failures {s.failures}, "
                f"locust CPU {s.client_cpu_per_s:.2f} s/s, server CPU s/s {s.server_cpu_per_s}"
            )
    finally:
        exit_code = server.stop() if server is not None else None
    slo = Slo(args.slo_ttft_p99_ms, args.slo_itl_p99_ms, args.slo_min_tokens_per_s)
    misses = [m for s in steps for m in slo.misses(s)]
    fatal = sum(s.fatal for s in steps)
    verdict = [f"- SLO missed: {m}" for m in misses]
    verdict.append(
        f"- failed requests (5xx, 4xx but 429, broken streams, transport errors): {fatal}"
    )
    if exit_code is not None:
        verdict.append(f"- the service started here exited with {exit_code} after SIGINT")
    verdict.append(f"- result: {'FAIL' if misses or fatal else 'PASS'}")
    header = describe(args, argv)
    (args.out / "summary.md").write_text(summary_markdown(steps, header, verdict))
    write_summary_csv(steps, args.out / "summary.csv")
    write_plots(steps, args.out, args.label or ("" if args.host else "CPU"))
    print((args.out / "summary.md").read_text())
    return 1 if misses or fatal else 0


if __name__ == "__main__":
    sys.exit(main())
