"""The engine's host work per step, without a GPU: the model's forward and logits stubbed
(zeros in, fixed random logits out), so what is timed is the Python of a step: scheduling,
step inputs, sampling, results, stream outputs, their packing and pickling as the engine
process sends them. A closed loop of ``--streams`` requests (prompts of 64-512 token ids,
``--max-tokens`` new tokens on average (each request 1/2 to 3/2 of it, so that requests
finish and arrive on different steps, as a server's do), EOS ignored, a new request as each
finishes), on a tiny random Llama on the CPU.

    python benchmarks/host_step_probe.py [--streams 256] [--seconds 10] [--temperature 0]
    py-spy record -o prof.txt -f raw -- python benchmarks/host_step_probe.py ...

On a GPU (`--device cuda --model 1b`) nothing is stubbed: the engine loop alone under steady
arrivals, as a server's engine process runs it but without front ends, for A/Bs of engine
settings in one process (`--variant piecewise_max_tokens=0 --variant
piecewise_max_tokens=2048 --rounds 3 --warmup 5`): much less noisy than a served run.

Prints output tokens/s and ms per step. Timings of the 2-core VM vary by ~10% between runs:
compare variants by profile shares (py-spy) or by several runs each, alternating.
"""

from __future__ import annotations

import argparse
import gc
import pickle
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from serving_probe import engine_args  # noqa: E402
from workloads import build_random_llama  # noqa: E402

from vllm_runner import SamplingParams  # noqa: E402
from vllm_runner.config import EngineArgs  # noqa: E402
from vllm_runner.engine.core import EngineCore  # noqa: E402
from vllm_runner.engine.serving_loop import pack  # noqa: E402
from vllm_runner.model import llama  # noqa: E402


def stub_model(vocab: int) -> None:
    """The forward returns zeros and the logits a fixed random table: no model work."""
    table = torch.randn(4096, vocab, generator=torch.Generator().manual_seed(0))

    def forward(self, input_ids, positions, rows=None):  # rows: only those go past attention
        n = input_ids.shape[0] if rows is None else len(rows)
        return torch.zeros(n, self.config.hidden_size)

    def compute_logits(self, hidden, out=None):
        return table[: hidden.shape[0]]

    llama.LlamaForCausalLM.forward = forward
    llama.LlamaForCausalLM.compute_logits = compute_logits


def run(args, extra: dict, seconds: float) -> tuple[float, float, int, list[float]]:
    """One engine: (tok/s, ms/step, steps, seconds to each request's first token)."""
    cuda = args.device == "cuda"
    path = build_random_llama(args.model, Path("/tmp/vllm_runner_bench"), args.device, 0)
    engine_args = EngineArgs(
        model=path, device=args.device, dtype="bfloat16" if cuda else "float32",
        max_model_len=1024, cpu_kv_cache_gb=0.5, max_num_seqs=args.streams, **extra,
    )  # fmt: skip
    engine = EngineCore(engine_args, serving=True)
    if not cuda:
        stub_model(engine.limits.vocab_size)
    rng = random.Random(0)
    longest = max(1, min(args.max_tokens * 3 // 2, 512))  # prompts <= 512, max_model_len 1024
    lengths = range(min(max(1, args.max_tokens // 2), longest), longest + 1)
    added = 0
    arrived: dict[str, float] = {}
    ttfts: list[float] = []

    def add() -> None:
        nonlocal added
        ids = [rng.randrange(1, 1000) for _ in range(rng.randrange(64, 513))]
        params = SamplingParams(
            max_tokens=rng.choice(lengths), ignore_eos=True, temperature=args.temperature
        )
        engine.add_request(ids, params, f"r{added}", ids, detokenize=False)
        arrived[f"r{added}"] = time.perf_counter()
        added += 1

    for _ in range(args.streams):
        add()
    tokens = steps = 0
    begin = start = time.perf_counter()
    timing = args.warmup <= 0
    while time.perf_counter() - start < seconds:
        if not timing and time.perf_counter() - begin >= args.warmup:
            timing, start, tokens, steps, ttfts = True, time.perf_counter(), 0, 0, []
        outputs = engine.step()
        pickle.dumps([pack(o) for o in outputs], protocol=pickle.HIGHEST_PROTOCOL)
        now = time.perf_counter()
        for o in outputs:
            tokens += len(o.new_token_ids)
            if o.request_id in arrived and o.new_token_ids:
                ttfts.append(now - arrived.pop(o.request_id))
        steps += 1
        for _ in engine.pop_finished():
            add()
    wall = time.perf_counter() - start
    return tokens / wall, wall / steps * 1e3, steps, ttfts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--device", default="cpu", help="cuda: the real model, nothing stubbed")
    ap.add_argument("--model", default="tiny", help="a workloads.LLAMA_SHAPES name")
    ap.add_argument("--warmup", type=float, default=0.0, help="seconds stepped before timing")
    ap.add_argument(
        "--variant", action="append", help="EngineArgs KEY=VALUE[,KEY=VALUE]: one engine each"
    )
    ap.add_argument("--rounds", type=int, default=1, help="the variants in turn, this often")
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    for r in range(args.rounds):
        for variant in args.variant or [""]:
            rate, ms, steps, ttfts = run(args, engine_args(variant), args.seconds)
            q = statistics.quantiles(ttfts, n=100) if len(ttfts) > 1 else [float("nan")] * 99
            label = f" [{variant}, round {r + 1}]" if variant else ""
            print(
                f"{args.streams} streams{label}: {rate:,.0f} tok/s, {ms:.2f} ms/step "
                f"({steps} steps), TTFT p50 / p99 {q[49] * 1e3:.0f} / {q[98] * 1e3:.0f} ms",
                flush=True,
            )
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
