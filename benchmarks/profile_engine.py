"""Where an engine step's time goes on W1: cProfile of one run (CUDA).

    python benchmarks/profile_engine.py --model 1b [--num-prompts 256] [--out prof.txt]

Time inside ``tolist`` is the host waiting for the GPU; the rest of ``step`` is host work
that the GPU waits for.
"""

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import build_random_llama, random_workload  # noqa: E402

from vllm_runner import LLM, SamplingParams  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="1b")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--root", default="/tmp/vllm_runner_bench")
    p.add_argument("--enforce-eager", action="store_true")
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
    steps, start = 0, time.perf_counter()
    profiler = cProfile.Profile()
    profiler.enable()
    while engine.has_unfinished():
        engine.step(stream=False)
        steps += 1
    profiler.disable()
    wall = time.perf_counter() - start
    buf = io.StringIO()
    pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(25)
    rate = 65536 / wall
    text = f"{args.model}: {steps} steps in {wall:.2f} s ({rate:,.0f} tok/s)\n" + buf.getvalue()
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
