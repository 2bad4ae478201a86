"""Where W1's time goes on a GPU: per-step wall time by step kind, and the top CUDA kernels.

    python benchmarks/profile_engine.py --model 8b [--num-prompts 256] [--torch-profile]

Without ``--torch-profile`` the host is profiled with cProfile instead (time inside
``synchronize``/``tolist`` is the host waiting for the GPU).
"""

import argparse
import cProfile
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


def run_steps(engine) -> tuple[dict, int]:
    """Step until done; wall time per step kind (pure decode vs with prefill)."""
    by_kind: dict[str, list[float]] = defaultdict(list)
    steps = 0
    while engine.has_unfinished():
        prefilling = any(
            r.num_computed_tokens < r.num_tokens - 1 for r in engine.scheduler.running
        ) or bool(engine.scheduler.waiting)
        start = time.perf_counter()
        engine.step(stream=False)
        by_kind["prefill+decode" if prefilling else "decode"].append(time.perf_counter() - start)
        steps += 1
    return by_kind, steps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="1b")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--root", default="/tmp/vllm_runner_bench")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--torch-profile", action="store_true")
    p.add_argument("--out")
    args = p.parse_args()
    Path(args.root).mkdir(parents=True, exist_ok=True)
    path = build_random_llama(args.model, Path(args.root), "cuda", 0)
    wl = random_workload(args.num_prompts, 128256, 64, 1024, 256, 0)
    llm = LLM(path, dtype="bfloat16", max_model_len=1280, enforce_eager=args.enforce_eager)
    params = SamplingParams(max_tokens=256, temperature=0.0, ignore_eos=True)
    llm.generate(wl.prompts[:8], params)
    engine = llm.engine
    for prompt in wl.prompts:
        engine.add_request(prompt, params)
    buf = io.StringIO()
    start = time.perf_counter()
    if args.torch_profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            by_kind, steps = run_steps(engine)
        torch.cuda.synchronize()
        buf.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    else:
        profiler = cProfile.Profile()
        profiler.enable()
        by_kind, steps = run_steps(engine)
        profiler.disable()
        pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(25)
    wall = time.perf_counter() - start
    lines = [f"{args.model}: {steps} steps in {wall:.2f} s ({65536 / wall:,.0f} tok/s)"]
    for kind, times in by_kind.items():
        lines.append(
            f"  {kind}: {len(times)} steps, {sum(times):.2f} s, "
            f"median {sorted(times)[len(times) // 2] * 1e3:.1f} ms"
        )
    text = "\n".join(lines) + "\n" + buf.getvalue()
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
