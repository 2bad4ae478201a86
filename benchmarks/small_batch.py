"""Decoding a few requests at once on a GPU (batch 1-16): the projections and the engine.

    python benchmarks/small_batch.py [--cases linear,engine] [--models 1b,8b] [--out x.json]

- linear: each Llama-3.2-1B / Llama-3-8B projection with M = 1-16 rows: F.linear (cuBLAS)
  and the one-row GEMV (``kernels.gemv``, M = 1), us per call and TB/s of weights, as
  CUDA-graph replays cycling through enough weight copies to miss L2 (``gemv.py``'s timing).
- engine: decode tok/s of B requests at once (128-token prompts, 256 new tokens each,
  prefill removed: B x (n - 1) / (t(n new) - t(1 new))) against B x the batch-1 bandwidth
  roofline (copy bandwidth / weight bytes; the KV bytes of these short contexts are < 3%).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
sys.path.append(str(Path(__file__).resolve().parent))

from gemv import SHAPES, graph_us, operands  # noqa: E402
from quant_offload import generate  # noqa: E402
from workloads import (  # noqa: E402
    Workload,
    build_random_llama,
    copy_bandwidth,
    free_memory,
    model_vocab,
    random_workload,
    weight_numel,
)

from benchmarks.throughput import git_commit  # noqa: E402


def bench_linear(args, report: dict) -> None:
    rows = []
    for model in args.models:
        for role, n, k in SHAPES[model]:
            rows += _linear_of_shape(model, role, n, k, args.rows)
            free_memory()
    report["linear"] = rows


def _linear_of_shape(model: str, role: str, n: int, k: int, ms: list[int]) -> list[dict]:
    from kernels.gemv import linear_one_row

    ws, x1, copies = operands(role, n, k)
    weight_bytes = ws[0].numel() * 2
    rows, gated = [], role == "gate_up"
    for m in ms:
        x = torch.randn(m, k, device="cuda").bfloat16()
        us = graph_us(lambda i, x=x: F.linear(x, ws[i]), copies)
        rows.append({"model": model, "role": role, "m": m, "kernel": "cublas", "us": us})
        line = f"  {model} {role:8s} M={m:<3d} cuBLAS {us:8.2f} us"
        if m == 1:
            g = graph_us(lambda i: linear_one_row(x1, ws[i], gated=gated), copies)
            rows.append({"model": model, "role": role, "m": 1, "kernel": "gemv", "us": g})
            line += f"  GEMV {g:8.2f} us"
        print(f"{line}  ({weight_bytes / us / 1e6:.2f} TB/s cuBLAS)", flush=True)
    return rows


def bench_engine(args, report: dict) -> None:
    from vllm_runner import LLM

    bw = report["copy_bandwidth_GBps"] * 1e9
    rows = []
    for model in args.models:
        model_dir = build_random_llama(model, Path(args.model_root), "cuda", 0)
        vocab = model_vocab(model_dir)
        roof = bw / (weight_numel(model_dir) * 2)
        llm = LLM(model=model_dir, dtype="bfloat16", device="cuda", max_model_len=400)
        generate(llm, random_workload(2, vocab, 128, 128, 16, 1))  # warm-up
        for b in args.batches:
            wl = random_workload(b, vocab, 128, 128, args.new_tokens, 2)
            one = Workload(wl.prompts, [1] * b, wl.vocab)
            t_n = statistics.median(generate(llm, wl.salted(r)) for r in range(args.repeats))
            t_1 = statistics.median(generate(llm, one.salted(100 + r)) for r in range(args.repeats))
            tok_s = b * (args.new_tokens - 1) / max(t_n - t_1, 1e-9)
            step_us = 1e6 * (t_n - t_1) / (args.new_tokens - 1)
            rows.append({"model": model, "batch": b, "tok_s": tok_s, "step_us": step_us,
                         "roofline_tok_s": b * roof, "fraction": tok_s / (b * roof)})  # fmt: skip
            print(f"  {model} batch {b:3d}: {tok_s:9.1f} tok/s, step {step_us:7.1f} us, "
                  f"{tok_s / (b * roof):.0%} of {b} x roofline {roof:.1f}", flush=True)  # fmt: skip
        del llm
        free_memory()
    report["engine"] = rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="linear,engine")
    p.add_argument("--models", default="1b,8b")
    p.add_argument("--rows", default="1,2,4,8,16", help="linear case: M values")
    p.add_argument("--batches", default="1,2,3,4,6,8,12,16", help="engine case: requests")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model-root", default="/tmp/vllm_runner_bench")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    args.models = args.models.split(",")
    args.rows = [int(m) for m in args.rows.split(",")]
    args.batches = [int(b) for b in args.batches.split(",")]
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": git_commit(),
        "card": torch.cuda.get_device_name(),
        "command": " ".join(["python", *sys.argv]),
        "copy_bandwidth_GBps": copy_bandwidth("cuda", 1 << 30) / 1e9,
    }
    print(f"{report['card']}: copy {report['copy_bandwidth_GBps']:,.0f} GB/s", flush=True)
    for case, fn in [("linear", bench_linear), ("engine", bench_engine)]:
        if case in args.cases.split(","):
            print(f"[{case}]", flush=True)
            fn(args, report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
