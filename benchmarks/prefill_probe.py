"""Prefill attention tile configs: one query head per program vs a GQA group of heads per
program (rows = tokens x heads sharing each K/V tile). CUDA only. Llama-3 heads (32 query,
8 kv; head_dim 128 as the 8B, 64 as the 1B), bf16, block_size 16, shuffled block tables;
cases: a W1 16384-token step of whole prompts of 64-1024 tokens, one 2048-token prompt, and
8 chunks of 512 tokens after 1024 cached ones. Prints each config's time, TFLOP/s (causal
FLOPs) and max difference from the first config's output.

    python benchmarks/prefill_probe.py [out.json]
"""

import itertools
import json
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels.prefill_attention import prefill_attention  # noqa: E402

BS = 16
gen = torch.Generator().manual_seed(1)
torch.randint(64, 1281, (256,), generator=gen)
lens, total = [], 0
while total < 16384:
    length = min(int(torch.randint(64, 1025, (1,), generator=gen)), 16384 - total)
    lens.append(length)
    total += length
cases = {"w1": (lens, lens), "n1_2048": ([2048], [2048]), "chunk": ([512] * 8, [1536] * 8)}
configs = [
    (64, 64, 4, 3, 1),
    (128, 32, 4, 4, 1),
    (16, 64, 4, 3, 4),
    (16, 32, 4, 4, 4),
    (16, 128, 4, 3, 4),
    (16, 64, 4, 4, 4),
    (32, 64, 8, 3, 4),
    (32, 32, 8, 3, 4),
    (32, 128, 8, 3, 4),
    (32, 64, 8, 4, 4),
    (32, 64, 8, 2, 4),
    (32, 64, 4, 3, 4),
    (64, 64, 8, 3, 4),
    (16, 64, 8, 3, 4),
    (32, 32, 4, 4, 4),
]
results = []
for head_dim in (128, 64):
    heads, kv_heads = 32, 8
    for name, (q_lens, seq_lens) in cases.items():
        per_seq = -(-max(seq_lens) // BS)
        nblk = len(seq_lens) * per_seq
        k = torch.randn(nblk, BS, kv_heads, head_dim, dtype=torch.bfloat16, device="cuda")
        v = torch.randn_like(k)
        tables = torch.randperm(nblk, device="cuda").to(torch.int32).view(len(seq_lens), per_seq)
        sl = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
        qsl = torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32, device="cuda")
        q = torch.randn(sum(q_lens), heads, head_dim, dtype=torch.bfloat16, device="cuda")
        flops = sum(
            4 * heads * head_dim * ql * (s - ql + (ql + 1) / 2)
            for ql, s in zip(q_lens, seq_lens, strict=True)
        )
        base = None
        for m, n, w, s, g in configs:

            def run(m=m, n=n, w=w, s=s, g=g, args=(q, k, v, tables, sl, qsl, head_dim**-0.5)):
                return prefill_attention(*args, block_m=m, block_n=n, num_warps=w,
                                         num_stages=s, group=g)  # fmt: skip

            try:
                out = run()
                ms = triton.testing.do_bench(run, warmup=25, rep=200, return_mode="median")
            except Exception as e:  # noqa: BLE001
                print(f"d={head_dim} {name} m={m} n={n} w={w} s={s} g={g}: {type(e).__name__}")
                continue
            if base is None:
                base = out.float()
            diff = (out.float() - base).abs().max().item()
            config = {"m": m, "n": n, "w": w, "s": s, "g": g}
            row = {"d": head_dim, "case": name, **config, "us": ms * 1e3,
                   "tflops": flops / ms / 1e9, "maxdiff": diff}  # fmt: skip
            results.append(row)
            print(
                f"d={head_dim} {name:8s} m={m:3d} n={n:3d} w={w} s={s} g={g}: "
                f"{ms * 1e3:8.1f} us {flops / ms / 1e9:6.1f} TFLOP/s diff {diff:.2e}",
                flush=True,
            )
if len(sys.argv) > 1:
    Path(sys.argv[1]).write_text(json.dumps(results, indent=1))
