"""Quantization and CPU weight offloading on one GPU (CUDA only), random-weight Llama-3-8B shape.

    python benchmarks/quant_offload.py [--cases b1,w1,offload,cap,tune] [--quick] [--out x.json]

Cases (each builds its own engines; run them in separate calls if one call has a time limit):
- b1: batch-1 decode tok/s for bf16 / int8 / fp8 (and fp8 with its weight-only decode path) /
  int4, (n - 1) / (t(n new) - t(1 new)) as in throughput.py, vs copy bandwidth / weight bytes
  read.
  ``--pdl-ab`` adds bf16 / int8 / fp8 engines with plain launches (``VLLM_RUNNER_PDL=0``).
- w1: workload W1 (throughput.py's: 256 prompts of 64-1024 random ids, 256 new tokens each,
  EOS ignored; --num-prompts) for fp8 and int4 vs bf16: output tok/s.
- offload: W1 with --offload-gb of weights in pinned host memory. Three runs of the same
  schedule (EOS ignored, so the batches do not depend on the tokens): streaming; the same
  engine with copies disabled (compute only: the resident step time of each step); and the
  fully resident engine (CUDA graphs). Steps are model forwards timed with CUDA events. Per
  step the bound is max(compute step, offloaded bytes / pinned H2D bandwidth); reported:
  sum(step) / sum(bound) (target <= 1.15) and the overlap achieved, 1 = copies fully hidden,
  0 = copies serialized with compute; also offloaded wall / max(resident wall, steps x copy).
- cap: a model that cannot fit: gpu_memory_utilization leaves --cap-gb on top of the memory
  in use (CUDA context); the resident engine must fail at start-up with the bytes missing,
  the offloaded one serves W1 (same bound as above).
- tune: the int8 kernel at M=1 on the 8B linear shapes over a few tile configs (block_m 1:
  the single-row GEMV kernel), GB/s of weight bytes vs bf16 F.linear, timed as CUDA-graph
  replays (to pick kernels/quant_matmul.default_config).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.throughput import (  # noqa: E402
    LLAMA_SHAPES,
    Workload,
    build_random_llama,
    copy_bandwidth,
    free_memory,
    git_commit,
    random_workload,
)

GiB = 1 << 30
LLAMA_SHAPES.setdefault("quick", (512, 8, 8, 4, 1024, 8192, True))  # --quick: 8 layers


def make_llm(model_dir: str, max_len: int, **kw):
    from vllm_runner import LLM

    return LLM(model=model_dir, dtype="bfloat16", device="cuda", max_model_len=max_len, **kw)


def generate(llm, w: Workload) -> float:
    """Wall seconds of one greedy run of ``w`` (EOS ignored)."""
    from vllm_runner import SamplingParams

    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in w.max_tokens]
    torch.cuda.synchronize()
    start = time.perf_counter()
    llm.generate(w.prompts, params)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def batch1_tok_s(llm, b1: Workload, repeats: int) -> float:
    one = Workload(b1.prompts, [1], b1.vocab)
    t_n = statistics.median(generate(llm, b1.salted(r)) for r in range(repeats))
    t_1 = statistics.median(generate(llm, one.salted(100 + r)) for r in range(repeats))
    return (b1.max_tokens[0] - 1) / max(t_n - t_1, 1e-9)


def read_bytes_per_token(llm) -> int:
    """Weight bytes one decode step reads: resident weights minus the embedding table."""
    model = llm.engine.runner.model
    return llm.stats()["weight_bytes_resident"] - model.model.embed_tokens.weight.nbytes


def bench_b1(args, model_dir: str, report: dict) -> None:
    from vllm_runner.model.layers.quant import Fp8W8A8

    b1 = random_workload(1, args.vocab, 128, 128, args.b1_tokens, args.seed + 2)
    bw = report["copy_bandwidth_GBps"] * 1e9
    rows = {}
    default = Fp8W8A8.weight_only_max_tokens
    cases = [
        ("bf16", None, default, "1"),
        ("int8", "int8", default, "1"),
        ("fp8", "fp8", default, "1"),
        ("fp8 (W8A8 _scaled_mm only)", "fp8", 0, "1"),
        ("int4", "int4", default, "1"),
    ]
    if args.pdl_ab:  # the same engines with plain launches (kernels/pdl.py)
        cases += [(f"{name} (no PDL)", quant, default, "0") for name, quant, *_ in cases[:3]]
    if args.b1_only:
        cases = [c for c in cases if c[0] in args.b1_only.split(",")]
    for name, quant, weight_only, pdl in cases:
        Fp8W8A8.weight_only_max_tokens = weight_only
        os.environ["VLLM_RUNNER_PDL"] = pdl
        llm = make_llm(model_dir, 128 + args.b1_tokens + 8, quantization=quant)
        generate(llm, b1.salted(50))  # warm-up
        tok_s = batch1_tok_s(llm, b1, args.repeats)
        nbytes = read_bytes_per_token(llm)
        rows[name] = {"tok_s": tok_s, "bytes_per_token": nbytes, "roofline_tok_s": bw / nbytes}
        print(f"  b1 {name:<26} {tok_s:8.1f} tok/s  ({tok_s * nbytes / bw:.0%} of roofline "
              f"{bw / nbytes:.1f}, {nbytes / GiB:.2f} GiB/token)", flush=True)  # fmt: skip
        del llm
        free_memory()
    Fp8W8A8.weight_only_max_tokens = default
    os.environ.pop("VLLM_RUNNER_PDL", None)
    for row in rows.values():
        row["vs_bf16"] = row["tok_s"] / rows["bf16"]["tok_s"]
    report["batch1"] = rows


def w1_workload(args) -> Workload:
    lo, hi, new = (16, 64, 16) if args.quick else (64, 1024, 256)
    return random_workload(args.num_prompts, args.vocab, lo, hi, new, args.seed)


def bench_w1(args, model_dir: str, report: dict) -> None:
    wl = w1_workload(args)
    warm = random_workload(4, args.vocab, 8, 32, 8, args.seed + 1)
    rows = {}
    for name, quant in [("bf16", None), ("fp8", "fp8"), ("int4", "int4")]:
        llm = make_llm(model_dir, args.max_len, quantization=quant)
        generate(llm, warm)
        wall = statistics.median(generate(llm, wl.salted(r)) for r in range(args.repeats))
        rows[name] = {"tok_s": wl.useful_tokens / wall, "wall_s": wall}
        print(f"  w1 {name:<5} {wl.useful_tokens / wall:10,.0f} tok/s ({wall:.1f} s)", flush=True)
        del llm
        free_memory()
    for name in ("fp8", "int4"):
        rows[name]["vs_bf16"] = rows[name]["tok_s"] / rows["bf16"]["tok_s"]
    report["w1"] = rows


def pinned_h2d_bandwidth(nbytes: int = GiB, iters: int = 5) -> float:
    """Bytes/s of a pinned host -> device copy on a side stream (what the offloader does)."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        dev.copy_(host, non_blocking=True)
        stream.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            dev.copy_(host, non_blocking=True)
        stream.synchronize()
    elapsed = time.perf_counter() - start
    del host, dev
    free_memory()
    return nbytes * iters / elapsed


def timed_forwards(llm, w: Workload) -> tuple[float, list[float]]:
    """(wall seconds, device seconds of each model forward) for one run of ``w``. Forwards are
    timed with CUDA events from the model's forward hooks, so copy waits count and the
    engine's host/device overlap does not blur steps; graph replays are not seen."""
    model = llm.engine.runner.model
    on_cuda = llm.engine.runner.device.type == "cuda"
    marks: list[list] = []

    def mark() -> object:
        if not on_cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    hooks = [
        model.register_forward_pre_hook(lambda m, a: marks.append([mark()])),
        model.register_forward_hook(lambda m, a, o: marks[-1].append(mark())),
    ]
    try:
        wall = generate(llm, w)
    finally:
        for h in hooks:
            h.remove()
    if not on_cuda:
        return wall, [end - start for start, end in marks]
    torch.cuda.synchronize()
    return wall, [start.elapsed_time(end) / 1e3 for start, end in marks]


def offload_runs(args, model_dir: str, wl: Workload, warm: Workload, **kw) -> dict:
    """Streaming vs compute-only steps of one offloaded engine; per-step bound and overlap."""
    llm = make_llm(model_dir, args.max_len, cpu_offload_gb=args.offload_gb, **kw)
    offloader = llm.engine.runner.model.weight_offloader
    generate(llm, warm)
    wall, steps = timed_forwards(llm, wl.salted(1))
    load = offloader._load
    offloader._load = lambda j: None  # compute only: stale weights, same kernels and schedule
    try:
        compute_wall, compute = timed_forwards(llm, wl.salted(2))
    finally:
        offloader._load = load
    copy_s = offloader.offloaded_bytes / args.h2d_Bps
    row = {
        "offloaded_bytes": offloader.offloaded_bytes,
        "offloaded_layers": len(offloader.host),
        "copy_ms_per_step": copy_s * 1e3,
        "wall_s": wall,
        "tok_s": wl.useful_tokens / wall,
        "compute_only_wall_s": compute_wall,
        "steps": len(steps),
        "mean_step_ms": 1e3 * sum(steps) / len(steps),  # model forward, device time
        "mean_compute_step_ms": 1e3 * sum(compute) / len(compute),
        "stats": llm.stats(),
    }
    if len(steps) == len(compute):
        bound = sum(max(c, copy_s) for c in compute)
        hideable = sum(min(c, copy_s) for c in compute)
        row["vs_bound"] = sum(steps) / bound
        row["overlap"] = (sum(compute) + len(steps) * copy_s - sum(steps)) / hideable
    else:  # NOTE: should not happen with EOS ignored; fall back to means
        mean_c = sum(compute) / len(compute)
        row["vs_bound"] = (sum(steps) / len(steps)) / max(mean_c, copy_s)
        row["overlap"] = (mean_c + copy_s - sum(steps) / len(steps)) / min(mean_c, copy_s)
    print(f"  offload {row['offloaded_layers']} layers ({row['offloaded_bytes'] / GiB:.2f} GiB, "
          f"copy {row['copy_ms_per_step']:.1f} ms/step): {row['tok_s']:,.0f} tok/s, step "
          f"{row['mean_step_ms']:.1f} ms vs compute {row['mean_compute_step_ms']:.1f} ms; "
          f"{row['vs_bound']:.2f}x the bound, overlap {row['overlap']:.0%}")  # fmt: skip
    del llm, offloader
    free_memory()
    return row


def bench_offload(args, model_dir: str, report: dict) -> None:
    wl, warm = w1_workload(args), random_workload(4, args.vocab, 8, 32, 8, args.seed + 1)
    row = offload_runs(args, model_dir, wl, warm)
    llm = make_llm(model_dir, args.max_len)
    generate(llm, warm)
    wall = generate(llm, wl.salted(3))
    steps_copy_s = row["steps"] * row["copy_ms_per_step"] / 1e3
    row["resident"] = {"wall_s": wall, "tok_s": wl.useful_tokens / wall}
    row["vs_resident_bound"] = row["wall_s"] / max(wall, steps_copy_s)
    print(f"  resident (CUDA graphs): {wl.useful_tokens / wall:,.0f} tok/s, {wall:.1f} s; "
          f"offloaded wall / max(resident wall, steps x copy time) = "
          f"{row['vs_resident_bound']:.2f}", flush=True)  # fmt: skip
    del llm
    free_memory()
    report["offload"] = row


def bench_cap(args, model_dir: str, report: dict) -> None:
    free_memory()
    free, total = torch.cuda.mem_get_info()
    # cap_gb on top of what others use now, counted as the engine counts it (this process's
    # cached allocator memory is free to it)
    util = (total - free - torch.cuda.memory_reserved() + args.cap_gb * GiB) / total
    try:
        make_llm(model_dir, args.max_len, gpu_memory_utilization=util)
        error = None
        print(f"  cap {args.cap_gb} GiB: the resident model fits; raise --offload-gb or lower it")
    except ValueError as e:
        error = str(e)
        print(f"  cap {args.cap_gb} GiB, resident: {error[:300]}", flush=True)
    free_memory()
    wl, warm = w1_workload(args), random_workload(4, args.vocab, 8, 32, 8, args.seed + 1)
    row = offload_runs(args, model_dir, wl, warm, gpu_memory_utilization=util)
    row.update(cap_gb=args.cap_gb, resident_error=error)
    report["cap"] = row


def bench_tune(args, report: dict) -> None:
    import triton.testing

    from kernels.launch import num_sms
    from kernels.quant_matmul import W8A16Config, default_config, w8a16_matmul
    from vllm_runner.model.layers.quant import quantize_fp8_rows, quantize_int8

    configs = [None] + [
        W8A16Config(bm, bn, bk, split, num_warps=w, num_stages=1 if bm == 1 else 4, prefetch=pf)
        for bm, bn, bk, split, w, pf in [
            (16, 32, 256, 1, 4, 1), (16, 64, 256, 4, 4, 1),
            # block_m 1: the single-row GEMV kernel (prefetch: its software pipeline, K
            # tiles in flight ahead of the one multiplied)
            (1, 16, 256, 1, 4, 1), (1, 8, 512, 1, 4, 1), (1, 4, 1024, 1, 4, 1),
            (1, 2, 2048, 1, 4, 1), (1, 16, 512, 1, 8, 1), (1, 8, 1024, 1, 4, 1),
            (1, 4, 1024, 1, 4, 2), (1, 4, 512, 1, 2, 2), (1, 2, 512, 1, 4, 2),
            (1, 2, 1024, 1, 4, 2), (1, 2, 2048, 1, 4, 2), (1, 4, 512, 1, 4, 2),
            (1, 8, 512, 1, 4, 2),
        ]
    ]  # fmt: skip
    rows = []
    # (n, k, gated): the 8B shape's qkv, o, gate_up (also as the fused SiLU GEMV) and down
    shapes = [(6144, 4096, False), (4096, 4096, False), (28672, 4096, False),
              (28672, 4096, True), (4096, 14336, False)]  # fmt: skip
    for (n, k, gated), wdtype in itertools.product(shapes, ("int8", "fp8")):
        quantize = quantize_int8 if wdtype == "int8" else quantize_fp8_rows
        q, scale = quantize(torch.randn(n, k, device="cuda") * 0.02)
        w = torch.randn(n, k, device="cuda").bfloat16()
        x = torch.randn(1, k, device="cuda").bfloat16()
        # NOTE: timed as CUDA-graph replays, as decode runs them: eager timing of a ~10 us
        # kernel measures the Python launch path instead.
        bench = triton.testing.do_bench_cudagraph
        bf16_ms = bench(lambda x=x, w=w: torch.nn.functional.linear(x, w))
        for cfg in configs:
            if gated and cfg is not None and cfg.block_m != 1:
                continue
            try:
                ms = bench(lambda x=x, q=q, s=scale, c=cfg, g=gated:
                           w8a16_matmul(x, q, s, config=c, gated=g))  # fmt: skip
            except Exception as e:  # one bad tile config must not end the sweep
                print(f"  tune {n}x{k} {cfg}: failed: {e!r}"[:300])
                continue
            used = cfg or default_config(1, n, k, num_sms(x.device))
            name = f"{wdtype} {n}x{k}{' gated' if gated else ''}"
            rows.append({"weights": wdtype, "n": n, "k": k, "gated": gated, "config": str(used),
                         "default": cfg is None, "us": ms * 1e3, "GBps": n * k / ms / 1e6,
                         "bf16_us": bf16_ms * 1e3, "speedup_vs_bf16": bf16_ms / ms})  # fmt: skip
            tag = "default " if cfg is None else ""
            print(f"  tune {name} {tag}{used}: {ms * 1e3:.1f} us, "
                  f"{n * k / ms / 1e6:,.0f} GB/s, {bf16_ms / ms:.2f}x bf16")  # fmt: skip
    report["tune"] = rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="b1,w1,offload")
    p.add_argument("--num-prompts", type=int, default=None, help="W1 prompts (256; quick 16)")
    p.add_argument("--offload-gb", type=float, default=None, help="8; quick 0.02")
    p.add_argument("--cap-gb", type=float, default=None, help="cap case budget (14; quick 0.1)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--pdl-ab", action="store_true", help="b1: also bf16/int8/fp8 without PDL")
    p.add_argument("--b1-only", default=None, help="b1: these engines only (e.g. bf16,int4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-root", default="/tmp/vllm_runner_bench")
    p.add_argument("--quick", action="store_true", help="8-layer toy shape, small workloads")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    shape = "quick" if args.quick else "8b"
    args.vocab = LLAMA_SHAPES[shape][5]
    args.num_prompts = args.num_prompts or (16 if args.quick else 256)
    args.offload_gb = args.offload_gb if args.offload_gb is not None else (
        0.02 if args.quick else 8.0)  # fmt: skip
    args.cap_gb = args.cap_gb or (0.1 if args.quick else 14.0)
    args.b1_tokens = 16 if args.quick else 256
    args.max_len = 128 if args.quick else 1280
    Path(args.model_root).mkdir(parents=True, exist_ok=True)
    cases = args.cases.split(",")
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": git_commit(),
        "card": torch.cuda.get_device_name(),
        "command": " ".join(["python", *sys.argv]),
        "torch": torch.__version__,
        "shape": shape,
        "copy_bandwidth_GBps": copy_bandwidth("cuda", GiB) / 1e9,
    }
    args.h2d_Bps = pinned_h2d_bandwidth()
    report["pinned_h2d_GBps"] = args.h2d_Bps / 1e9
    print(f"{report['card']}: copy {report['copy_bandwidth_GBps']:,.0f} GB/s (read + write), "
          f"pinned H2D {report['pinned_h2d_GBps']:.1f} GB/s", flush=True)  # fmt: skip
    if "tune" in cases:
        bench_tune(args, report)
    model_dir = None
    for case, fn in [("b1", bench_b1), ("w1", bench_w1), ("offload", bench_offload),
                     ("cap", bench_cap)]:  # fmt: skip
        if case in cases:
            model_dir = model_dir or build_random_llama(shape, Path(args.model_root), "cuda", 0)
            print(f"[{case}] {shape}", flush=True)
            fn(args, model_dir, report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
