"""A/B of two CPU-path variants in one process, alternating: sampled decoding of 48 prompts
of mixed lengths (16 / 96 / 480 token ids), 64 new tokens each, temperature 1.

    python benchmarks/cpu_ab.py --case sampler [--model DIR]  # inverse CDF / exponential race
    python benchmarks/cpu_ab.py --case attention  # decode rows grouped by length / one batch
    python benchmarks/cpu_ab.py --case gather  # K/V rows by index_select / by indexing

The first run in a process is slow (oneDNN and allocator warm-up): one untimed pass first.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # (benchmarks/kernels.py shadows)
from kernels import reference  # noqa: E402
from vllm_runner import LLM, SamplingParams  # noqa: E402
from vllm_runner.sample import sampler  # noqa: E402


def _variants(case: str) -> dict[str, tuple[object, str, object]]:
    """name -> (module, attribute, value): what each variant sets."""
    if case == "sampler":

        def race(probs, rows, generator):  # (unseeded rows: one tensor of variates)
            q = torch.empty_like(probs).exponential_(generator=generator)
            return (probs / q).argmax(dim=-1)

        now = sampler.inverse_cdf_sample
        return {
            "exponential race": (sampler, "inverse_cdf_sample", race),
            "inverse CDF": (sampler, "inverse_cdf_sample", now),
        }

    if case == "gather":

        def indexing(cache, slots, dtype):
            return reference._slots_view(cache)[slots].view(cache.dtype).to(dtype)

        now = reference._gather
        return {
            "indexing": (reference, "_gather", indexing),
            "index_select": (reference, "_gather", now),
        }

    def one_batch(query, k_cache, v_cache, tables, seq_lens, scale):
        return reference._attend(query[:, None], k_cache, v_cache, tables, seq_lens, scale)[:, 0]

    now = reference._attend_decode
    return {
        "one padded batch": (reference, "_attend_decode", one_batch),
        "groups of like length": (reference, "_attend_decode", now),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--case", choices=["sampler", "attention", "gather"], required=True)
    ap.add_argument("--model", help="a model folder (default: the default model)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    llm = LLM(args.model, device="cpu", dtype="float32") if args.model else LLM(device="cpu")
    rng = random.Random(0)
    lengths = [rng.choice([16, 96, 480]) for _ in range(48)]
    prompts = [[rng.randrange(1000, 20000) for _ in range(n)] for n in lengths]
    params = SamplingParams(max_tokens=64, temperature=1.0, ignore_eos=True)
    variants = _variants(args.case)
    llm.generate(prompts, params)  # (warm-up)
    for _ in range(args.rounds):
        for name, (module, attribute, value) in variants.items():
            setattr(module, attribute, value)
            start = time.perf_counter()
            outs = llm.generate(prompts, params)
            wall = time.perf_counter() - start
            tokens = sum(len(o.token_ids) for o in outs)
            print(
                f"{name}: {tokens} tokens in {wall:.2f} s = {tokens / wall:.1f} tok/s", flush=True
            )


if __name__ == "__main__":
    main()
