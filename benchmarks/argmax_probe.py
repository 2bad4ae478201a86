"""Greedy argmax of a few rows on a GPU: torch's argmax, the sampler's previous path (two
stages of torch ops: five kernels) and ``kernels.argmax`` (one launch), each alone, as
back-to-back launches and in a CUDA graph; then batch-1 decode tok/s of one engine whose
sampler takes the kernel or the two-stage path in turn (alternating rounds). CUDA only.

    python benchmarks/argmax_probe.py [--models 1b,8b] [--rounds 3] [--out out.json]
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.quant_offload import batch1_tok_s, make_llm  # noqa: E402
from benchmarks.sampler_probe import time_ms, two_stage_argmax  # noqa: E402
from benchmarks.throughput import (  # noqa: E402
    build_random_llama,
    copy_bandwidth,
    free_memory,
    git_commit,
    random_workload,
)
from kernels.argmax import MAX_ROWS, argmax_rows  # noqa: E402


def graph_us(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3


def micro(report: dict) -> None:
    counts = torch.zeros(MAX_ROWS, dtype=torch.int32, device="cuda")
    for rows in (1, 4, 16):
        logits = torch.randn(rows, 128256, device="cuda", dtype=torch.bfloat16)
        want = logits.argmax(-1)
        fns = {
            "torch": lambda lg=logits: lg.argmax(-1),
            "two_stage": lambda lg=logits: two_stage_argmax(lg),
            "kernel": lambda lg=logits: argmax_rows(lg, counts),
        }
        for name, fn in fns.items():
            row = dict(rows=rows, path=name, same=bool(torch.equal(fn(), want)))
            # back-to-back launches (as the sampler runs them, outside the graph), then in one
            row["launches_us"], row["graph_us"] = time_ms(fn, calls=200) * 1e3, graph_us(fn)
            report["micro"].append(row)
            print(f"rows={rows:2d} {name:9s} launches {row['launches_us']:6.2f} us, graph "
                  f"{row['graph_us']:6.2f} us, same={row['same']}", flush=True)  # fmt: skip


def engine_ab(model: str, rounds: int, repeats: int, report: dict) -> None:
    model_dir = build_random_llama(model, Path("/tmp/vllm_runner_bench"), "cuda", 0)
    b1 = random_workload(1, 128256, 128, 128, 256, 2)
    llm = make_llm(model_dir, 512)
    sampler = llm.engine.runner.sampler
    tok_s = {"kernel": [], "two_stage": []}
    for r in range(rounds):
        order = ("kernel", "two_stage") if r % 2 == 0 else ("two_stage", "kernel")
        for path in order:
            if path == "two_stage":
                sampler.greedy = two_stage_argmax  # (an instance attribute: the method's stand-in)
            else:
                vars(sampler).pop("greedy", None)
            tok_s[path].append(batch1_tok_s(llm, b1, repeats))
            print(f"[{model}] round {r} {path}: {tok_s[path][-1]:,.1f} tok/s", flush=True)
    report["engine_batch1"][model] = {
        k: dict(runs=v, median=statistics.median(v)) for k, v in tok_s.items()
    }
    del llm, sampler
    free_memory()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="1b,8b")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="batch-1 timings per round")
    ap.add_argument("--out")
    args = ap.parse_args()
    bw = copy_bandwidth("cuda", 1 << 30) / 1e9
    report = dict(card=torch.cuda.get_device_name(), commit=git_commit(), copy_bandwidth_GBps=bw,
                  micro=[], engine_batch1={})  # fmt: skip
    micro(report)
    for model in filter(None, args.models.split(",")):
        engine_ab(model, args.rounds, args.repeats, report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
