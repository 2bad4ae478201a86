"""The engine's host work per step, without a GPU: the model's forward and logits stubbed
(zeros in, fixed random logits out), so what is timed is the Python of a step: scheduling,
step inputs, sampling, results, stream outputs, their packing and pickling as the engine
process sends them. A closed loop of ``--streams`` requests (prompts of 64-512 token ids,
``--max-tokens`` new tokens, EOS ignored, a new request as each finishes), on a tiny random
Llama on the CPU.

    python benchmarks/host_step_probe.py [--streams 256] [--seconds 10] [--temperature 0]
    py-spy record -o prof.txt -f raw -- python benchmarks/host_step_probe.py ...

Prints output tokens/s and ms per step. Timings of the 2-core VM vary by ~10% between runs:
compare variants by profile shares (py-spy) or by several runs each, alternating.
"""

from __future__ import annotations

import argparse
import pickle
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from workloads import build_random_llama  # noqa: E402

from vllm_runner import SamplingParams  # noqa: E402
from vllm_runner.config import EngineArgs  # noqa: E402
from vllm_runner.engine.core import EngineCore  # noqa: E402
from vllm_runner.engine.serving_loop import pack  # noqa: E402
from vllm_runner.model import llama  # noqa: E402


def stub_model(vocab: int) -> None:
    """The forward returns zeros and the logits a fixed random table: no model work."""
    table = torch.randn(4096, vocab, generator=torch.Generator().manual_seed(0))

    def forward(self, input_ids, positions):
        return torch.zeros(input_ids.shape[0], self.config.hidden_size)

    def compute_logits(self, hidden):
        return table[: hidden.shape[0]]

    llama.LlamaForCausalLM.forward = forward
    llama.LlamaForCausalLM.compute_logits = compute_logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    path = build_random_llama("tiny", Path("/tmp/vllm_runner_bench"), "cpu", 0)
    engine_args = EngineArgs(
        model=path, device="cpu", dtype="float32", max_model_len=1024,
        cpu_kv_cache_gb=0.5, max_num_seqs=args.streams,
    )  # fmt: skip
    engine = EngineCore(engine_args, serving=True)
    stub_model(engine.limits.vocab_size)
    rng = random.Random(0)
    params = SamplingParams(
        max_tokens=args.max_tokens, ignore_eos=True, temperature=args.temperature
    )
    added = 0

    def add() -> None:
        nonlocal added
        ids = [rng.randrange(1, 1000) for _ in range(rng.randrange(64, 513))]
        engine.add_request(ids, params, f"r{added}", ids, detokenize=False)
        added += 1

    for _ in range(args.streams):
        add()
    tokens = steps = 0
    start = time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        outputs = engine.step()
        pickle.dumps([pack(o) for o in outputs], protocol=pickle.HIGHEST_PROTOCOL)
        tokens += sum(len(o.new_token_ids) for o in outputs)
        steps += 1
        for _ in engine.pop_finished():
            add()
    wall = time.perf_counter() - start
    print(
        f"{args.streams} streams: {tokens / wall:,.0f} tok/s, {wall / steps * 1e3:.2f} ms/step "
        f"({steps} steps)"
    )


if __name__ == "__main__":
    main()
