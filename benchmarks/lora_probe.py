"""What LoRA costs on a GPU: decode and prefill time of one workload on a random Llama, with
LoRA off, on but unused (enable_lora, no request names an adapter), one adapter, and
``max_loras`` adapters mixed in every step.

    python benchmarks/lora_probe.py [--model 1b] [--max-loras 4] [--rank 16] [--out x.json]

Each case is a fresh engine (CUDA graphs on): the workload's wall time (64 prompts of
128-512 tokens, 128 new tokens each, EOS ignored), the median of ``--repeats`` runs, and
tokens/s; the "off" case is the base path, which must not move.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.append(str(Path(__file__).resolve().parent))

from lora_testing import write_adapter  # noqa: E402
from workloads import build_random_llama, free_memory, random_workload  # noqa: E402

from vllm_runner import LLM, LoRARequest, SamplingParams  # noqa: E402


def run(llm: LLM, prompts: list, loras: list, new: int) -> float:
    import time

    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    llm.generate(prompts, params, lora_request=loras)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="1b")
    parser.add_argument("--max-loras", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    root = Path(tempfile.gettempdir()) / "vllm-runner-bench"
    path = build_random_llama(args.model, root, "cuda", seed=0)
    adapters = [
        LoRARequest(f"l{i}", i + 1, write_adapter(str(root / f"lora-{args.model}-{i}"), path,
                                                  rank=args.rank, seed=i, std=0.01))
        for i in range(args.max_loras)
    ]  # fmt: skip
    w = random_workload(64, 32000, 128, 512, 128, seed=0)
    n = len(w.prompts)
    cases = {
        "off": ({}, [None] * n),
        "on, unused": ({"enable_lora": True}, [None] * n),
        "one adapter": ({"enable_lora": True}, [adapters[0]] * n),
        f"{args.max_loras} adapters mixed": ({"enable_lora": True},
                                             [adapters[i % args.max_loras] for i in range(n)]),
    }  # fmt: skip
    report = {"model": args.model, "rank": args.rank, "max_loras": args.max_loras, "cases": {}}
    for name, (kw, loras) in cases.items():
        llm = LLM(path, device="cuda", dtype="bfloat16", max_model_len=1024,
                  gpu_memory_utilization=0.5, max_loras=args.max_loras,
                  max_lora_rank=max(16, args.rank), **kw)  # fmt: skip
        run(llm, w.prompts[:4], loras[:4], 4)  # warm-up
        times = [run(llm, w.prompts, loras, 128) for _ in range(args.repeats)]
        seconds = statistics.median(times)
        report["cases"][name] = {"seconds": seconds, "tok_s": n * 128 / seconds}
        print(f"{name:>22}: {seconds:.3f} s, {n * 128 / seconds:,.0f} tok/s", flush=True)
        del llm
        free_memory()
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
