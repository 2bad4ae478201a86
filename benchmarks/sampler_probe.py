"""Probe: what the sampler's step costs on a GPU, by sampling setting and row count.

    python benchmarks/sampler_probe.py [--out sampler.json]

Llama-3 vocabulary (128256), bf16 logits as the LM head gives them (a scaled normal: a few
dozen tokens carry most of the mass, as a trained model's). Times ``Sampler.sample`` (the
device work of a step, no host sync) over 10 calls with CUDA events, median of 5; and
``before``: the sampler before kernels/sampling.py (an fp32 copy, a full sort for top-k /
top-p, a tensor of exponential variates), kept here only as the baseline. Then the kernel
alone at top_p 0.95 for each tile, warp count and split (programs a row).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.sampling import _programs, sample_rows, split_for  # noqa: E402
from vllm_runner.sample import sampler as S  # noqa: E402
from vllm_runner.sample.rows import SamplingRow, host_values  # noqa: E402
from vllm_runner.sample.sampler import Sampler  # noqa: E402
from vllm_runner.sampling_params import SamplingParams  # noqa: E402

SETTINGS = {
    "greedy (argmax only)": None,
    "greedy, logprobs=1": dict(temperature=0.0, logprobs=1),
    "temperature 0.8": dict(temperature=0.8),
    "temperature 0.8, top_p 0.95": dict(temperature=0.8, top_p=0.95),
    "temperature 0.8, top_k 50": dict(temperature=0.8, top_k=50),
    "temperature 0.8, top_k 50, top_p 0.95": dict(temperature=0.8, top_k=50, top_p=0.95),
    "temperature 0.8, min_p 0.05": dict(temperature=0.8, min_p=0.05),
}


def host_ms(fn, calls: int = 10, repeats: int = 5) -> float:
    """Host time per call: each call alone on an idle GPU (launches only queue)."""
    times = []
    for _ in range(repeats):
        total = 0.0
        for _ in range(calls):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            total += time.perf_counter() - t0
        times.append(total / calls * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def time_ms(fn, calls: int = 10, repeats: int = 5) -> float:
    """GPU time per call (idle time included: a host slower than the GPU shows)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(True), torch.cuda.Event(True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def two_stage_argmax(logits: torch.Tensor) -> torch.Tensor:  # [rows, vocab] -> [rows]
    """The sampler's greedy path for up to 16 rows before ``kernels.argmax``: the first
    maximum of each group of 256 entries, then the first best group (vocab % 256 == 0)."""
    rows, vocab = logits.shape
    if rows > 16:
        return logits.argmax(dim=-1)
    best, index = logits.reshape(rows, vocab // 256, 256).max(dim=-1)
    g = best.argmax(dim=-1, keepdim=True)
    return (g * 256 + index.gather(-1, g)).squeeze(-1)


def before(logits: torch.Tensor, rows, generator: torch.Generator) -> torch.Tensor:
    """The sampled path before the kernel (plain rows: no penalties, bias or seeds)."""
    logits = logits.float()
    if rows is None or all(r.params.greedy for r in rows):
        return two_stage_argmax(logits)
    temps = host_values(
        [1.0 if r.params.greedy else r.params.temperature for r in rows],
        torch.float32,
        logits.device,
    )
    probs = S.apply_top_k_top_p_min_p(logits / temps[:, None], rows).softmax(dim=-1)
    q = torch.empty_like(probs).exponential_(generator=generator)
    is_greedy = host_values([r.params.greedy for r in rows], torch.bool, logits.device)
    return torch.where(is_greedy, two_stage_argmax(logits), (probs / q).argmax(dim=-1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--rows", default="1,4,16,64,256")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    sampler, results = Sampler(torch.device("cuda"), 0), []
    for n in map(int, args.rows.split(",")):
        logits = (torch.randn(n, args.vocab, device="cuda") * 4).bfloat16()
        for name, kw in SETTINGS.items():
            rows = None if kw is None else [SamplingRow(SamplingParams(**kw), [1], 1, None)] * n
            ms = time_ms(lambda x=logits, rows=rows: sampler.sample(x, rows))
            was = time_ms(lambda x=logits, rows=rows: before(x, rows, sampler.generator))
            host = host_ms(lambda x=logits, rows=rows: sampler.sample(x, rows))
            was_host = host_ms(lambda x=logits, rows=rows: before(x, rows, sampler.generator))
            t = {"ms": ms, "before_ms": was, "host_ms": host, "before_host_ms": was_host}
            results.append({"rows": n, "setting": name} | {k: round(v, 4) for k, v in t.items()})
            print(f"{n:4d} rows  {name:40s} {ms:8.3f} ms (before: {was:.3f}); host {host:.3f} "
                  f"(before: {was_host:.3f})", flush=True)  # fmt: skip
        params = torch.tensor([[0.8, 0.95, 0.0, 0.0]], device="cuda").repeat(n, 1)
        seeds = torch.arange(n, device="cuda", dtype=torch.int64) * 7919
        auto = split_for(n, args.vocab, 2048, _programs(logits.device))
        for block, warps, split in itertools.product((2048, 4096), (8, 16), (1, 4, 8, 16, 32)):
            if split > 1 and n * split > _programs(logits.device):
                continue
            ms = time_ms(lambda b=block, w=warps, s=split, x=logits, p=params, k=seeds:
                         sample_rows(x, p, k, b, w, s))  # fmt: skip
            results.append({"rows": n, "kernel": [block, warps, split], "ms": round(ms, 4)})
            print(
                f"{n:4d} rows  kernel, top_p 0.95, block {block}, {warps} warps, split {split}"
                f"{' (auto)' if split == auto and block == 2048 else ''} {ms:8.3f} ms"
            )
    if args.out:
        card = torch.cuda.get_device_name()
        Path(args.out).write_text(json.dumps({"card": card, "results": results}, indent=1))


if __name__ == "__main__":
    main()
