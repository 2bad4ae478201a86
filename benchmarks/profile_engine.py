"""Where W1's time goes on a GPU: per-step wall time by step kind, and the top CUDA kernels.

    python benchmarks/profile_engine.py --model 8b [--num-prompts 256] [--torch-profile]
        [--quantization int8|fp8] [--max-tokens 256]
        [--no-profile] [--max-num-batched-tokens N] [--log-compiles]

Without ``--torch-profile`` the host is profiled with cProfile instead (time inside
``synchronize``/``tolist`` is the host waiting for the GPU); ``--no-profile`` keeps only the
per-step walls. ``--log-compiles`` lists every Triton compile inside the timed steps (a
compile there is a stall a serving user would see).
"""

import argparse
import cProfile
import gc
import io
import pstats
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from workloads import build_random_llama, random_workload  # noqa: E402

from vllm_runner import LLM, SamplingParams  # noqa: E402


def log_triton_compiles(log: list, compiles: list[str] | None) -> None:
    """Append "step i: kernel signature" to ``compiles`` for each Triton compile from now on
    (``None``: stop logging)."""
    import triton

    def hook(*, repr: str, **_) -> bool:
        compiles.append(f"step {len(log)}: {repr}")
        return False  # compile as usual

    triton.knobs.runtime.jit_cache_hook = hook if compiles is not None else None


def run_steps(
    engine, on_first_decode=None, compiles: list | None = None
) -> tuple[dict, list[tuple[int, int, float]]]:
    """Step until done; wall time per step kind (pure decode vs with prefill), and per step
    (scheduled requests, scheduled tokens, wall ms) of the step scheduled in that call.
    ``on_first_decode`` runs once, before the first step that schedules only decodes."""
    by_kind: dict[str, list[float]] = defaultdict(list)
    log: list[tuple[int, int, float]] = []
    if compiles is not None:
        log_triton_compiles(log, compiles)
    schedule = engine.scheduler.schedule
    scheduled: list = []

    def recording_schedule():
        out = schedule()
        scheduled.append(out)
        return out

    engine.scheduler.schedule = recording_schedule
    pauses: list[float] = []
    full: list[float] = []  # of them, full (oldest-generation) collections
    started = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses.append(time.perf_counter() - started[0])
            if info["generation"] == 2:
                full.append(pauses[-1])

    gc.callbacks.append(on_gc)
    try:
        while engine.has_unfinished():
            if on_first_decode is not None and log and log[-1][0] == log[-1][1]:
                on_first_decode()
                on_first_decode = None
            start = time.perf_counter()
            engine.step(stream=False)
            wall = time.perf_counter() - start
            sched = scheduled.pop() if scheduled else None
            reqs = len(sched.num_scheduled_tokens) if sched else 0
            tokens = sched.total_num_scheduled_tokens if sched else 0
            by_kind["decode" if tokens == reqs else "prefill+decode"].append(wall)
            log.append((reqs, tokens, wall * 1e3))
    finally:
        engine.scheduler.schedule = schedule
        gc.callbacks.remove(on_gc)
        if compiles is not None:
            log_triton_compiles(log, None)
    by_kind["gc pause"] = pauses
    by_kind["gc full"] = full
    return by_kind, log


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="1b")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--root", default="/tmp/vllm_runner_bench")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--torch-profile", action="store_true")
    p.add_argument("--no-profile", action="store_true", help="per-step walls only")
    p.add_argument("--max-num-batched-tokens", type=int)
    p.add_argument("--quantization", choices=["int8", "fp8"], default=None)
    p.add_argument("--max-tokens", type=int, default=256, help="new tokens per prompt")
    p.add_argument("--log-compiles", action="store_true", help="Triton compiles during steps")
    p.add_argument("--passes", type=int, default=1, help="W1 runs (--no-profile); the last timed")
    p.add_argument("--out")
    args = p.parse_args()
    if args.passes > 1 and not args.no_profile:
        p.error("--passes > 1 needs --no-profile (the profilers cover one pass)")
    Path(args.root).mkdir(parents=True, exist_ok=True)
    path = build_random_llama(args.model, Path(args.root), "cuda", 0)
    wl = random_workload(args.num_prompts, 128256, 64, 1024, args.max_tokens, 0)
    llm = LLM(
        path,
        dtype="bfloat16",
        max_model_len=1280,
        enforce_eager=args.enforce_eager,
        max_num_batched_tokens=args.max_num_batched_tokens,
        quantization=args.quantization,
    )
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(wl.salted(2000).prompts[:8], params)
    engine = llm.engine
    compiles: list[str] | None = [] if args.log_compiles else None
    earlier: list[str] = []
    for i in range(args.passes - 1):
        for prompt in wl.salted(1000 + i).prompts:  # no prefix-cache hits in the last pass
            engine.add_request(prompt, params)
        start = time.perf_counter()
        pass_compiles: list[str] | None = [] if args.log_compiles else None
        run_steps(engine, compiles=pass_compiles)
        count = f", {len(pass_compiles)} Triton compiles" if pass_compiles is not None else ""
        earlier.append(f"pass {i + 1}: {time.perf_counter() - start:.2f} s{count}")
    for prompt in wl.prompts:
        engine.add_request(prompt, params)
    buf = io.StringIO()
    start = time.perf_counter()
    if args.torch_profile:
        from torch.profiler import ProfilerActivity, profile

        # Two profiles: the steps up to the last prefill chunk, then the pure-decode rest
        # (async scheduling puts one step of each phase's GPU work in the other: negligible).
        profs = [profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])]

        def next_phase() -> None:
            torch.cuda.synchronize()
            profs[0].stop()
            profs.append(profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]))
            profs[1].start()

        profs[0].start()
        by_kind, log = run_steps(engine, next_phase, compiles)
        torch.cuda.synchronize()
        profs[-1].stop()
        for title, prof in zip(("steps with prefill", "pure decode steps"), profs, strict=False):
            buf.write(f"\n== {title}\n")
            buf.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30))
    elif args.no_profile:
        by_kind, log = run_steps(engine, compiles=compiles)
    else:
        profiler = cProfile.Profile()
        profiler.enable()
        by_kind, log = run_steps(engine, compiles=compiles)
        profiler.disable()
        pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(25)
    wall = time.perf_counter() - start
    tokens = sum(wl.max_tokens)
    lines = [f"{args.model}: {len(log)} steps in {wall:.2f} s ({tokens / wall:,.0f} tok/s)"]
    lines += [f"  earlier {e}" for e in earlier]
    if compiles is not None:
        lines.append(f"Triton compiles during steps: {len(compiles)}")
        lines += [f"  {c[:400]}" for c in compiles]
    lines.append(f"stats: {engine.stats()}")
    for kind, times in by_kind.items():
        if times:
            lines.append(
                f"  {kind}: {len(times)} times, {sum(times):.2f} s, median "
                f"{sorted(times)[len(times) // 2] * 1e3:.1f} ms, max {max(times) * 1e3:.1f} ms"
            )
    lines.append(
        "per step (requests, tokens, wall ms): " + " ".join(f"{r}/{t}/{w:.1f}" for r, t, w in log)
    )
    text = "\n".join(lines) + "\n" + buf.getvalue()
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
