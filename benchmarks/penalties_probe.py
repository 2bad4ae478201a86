"""Probe: the sampler's penalties for many rows on a GPU, all rows at once (the sampler now)
against the per-row loop it replaced (kept here only as the baseline).

    python benchmarks/penalties_probe.py

Llama-3 vocabulary (128256); repetition 1.1 and frequency 0.2 on every row. Prints wall and
GPU ms per call and the largest difference between the two (they agree to fp32 rounding).
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_runner.sample import sampler as S  # noqa: E402
from vllm_runner.sample.rows import SamplingRow  # noqa: E402
from vllm_runner.sampling_params import SamplingParams  # noqa: E402


def per_row(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """The sampler's penalties before 4f2e6c5: a bincount and two copies per row."""
    vocab, device = logits.shape[1], logits.device
    for i, row in enumerate(rows):
        p = row.params
        out = torch.tensor(row.output_token_ids, dtype=torch.long, device=device)
        counts = torch.bincount(out, minlength=vocab)[:vocab].to(logits.dtype)
        if p.repetition_penalty != 1.0:
            seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            seen[torch.tensor(row.prompt_token_ids, dtype=torch.long, device=device)] = True
            seen |= counts > 0
            x = logits[i]
            r = p.repetition_penalty
            logits[i] = torch.where(seen, torch.where(x > 0, x / r, x * r), x)
        logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)


def main() -> None:
    rng, vocab = random.Random(0), 128256
    params = SamplingParams(repetition_penalty=1.1, frequency_penalty=0.2)
    for n, prompt_len, output_len in ((256, 500, 200), (64, 2000, 1000)):
        rows = [
            SamplingRow(
                params,
                [rng.randrange(vocab) for _ in range(prompt_len + output_len)],
                prompt_len,
                None,
            )  # fmt: skip
            for _ in range(n)
        ]
        base = torch.randn(n, vocab, device="cuda")
        results = {}
        for name, fn in (("per_row", per_row), ("batched", S.apply_penalties)):
            x = base.clone()
            fn(x, rows)
            results[name] = x
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(True), torch.cuda.Event(True)
            t0 = time.perf_counter()
            start.record()
            for _ in range(5):
                fn(base.clone(), rows)
            end.record()
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) / 5 * 1e3
            print(f"{n} rows, {prompt_len} + {output_len} tokens: {name} {wall:.2f} ms wall, "
                  f"{start.elapsed_time(end) / 5:.2f} ms GPU", flush=True)  # fmt: skip
        diff = (results["per_row"] - results["batched"]).abs().max().item()
        print(f"max difference {diff:.3g}")


if __name__ == "__main__":
    main()
