"""Prefill attention tile configs: one query head per program vs a GQA group of heads per
program (rows = tokens x heads sharing each K/V tile). CUDA only. Llama-3 heads (32 query,
8 kv; head_dim 128 as the 8B, 64 as the 1B), bf16, block_size 16, shuffled block tables;
cases: a W1 16384-token step of whole prompts of 64-1024 tokens, one 2048-token prompt, and
8 chunks of 512 tokens after 1024 cached ones. Prints each config's time, TFLOP/s (causal
FLOPs) and max difference from the first config's output. ``--fp8``: over an e4m3 copy of
the caches, against the bf16 caches, in the engine's default config only.

    python benchmarks/prefill_probe.py [out.json] [--fp8]
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
FP8 = "--fp8" in sys.argv
OUT = [a for a in sys.argv[1:] if a != "--fp8"]
kv_dtypes = (torch.bfloat16, torch.float8_e4m3fn) if FP8 else (torch.bfloat16,)
results = []
for head_dim, kv_dtype in itertools.product((128, 64), kv_dtypes):
    heads, kv_heads = 32, 8
    for name, (q_lens, seq_lens) in cases.items():
        per_seq = -(-max(seq_lens) // BS)
        nblk = len(seq_lens) * per_seq
        k = torch.randn(nblk, BS, kv_heads, head_dim, device="cuda").to(kv_dtype)
        v = torch.randn(nblk, BS, kv_heads, head_dim, device="cuda").to(kv_dtype)
        tables = torch.randperm(nblk, device="cuda").to(torch.int32).view(len(seq_lens), per_seq)
        sl = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
        qsl = torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32, device="cuda")
        q = torch.randn(sum(q_lens), heads, head_dim, dtype=torch.bfloat16, device="cuda")
        flops = sum(
            4 * heads * head_dim * ql * (s - ql + (ql + 1) / 2)
            for ql, s in zip(q_lens, seq_lens, strict=True)
        )
        base = None
        for m, n, w, s, g in [(None,) * 5] if FP8 else configs:  # fp8: the default tiles

            def run(m=m, n=n, w=w, s=s, g=g, args=(q, k, v, tables, sl, qsl, head_dim**-0.5)):
                tiles = {} if FP8 else dict(block_m=m, block_n=n, num_warps=w, num_stages=s,
                                            group=g)  # fmt: skip
                return prefill_attention(*args, **tiles)

            try:
                out = run()
                ms = triton.testing.do_bench(run, warmup=25, rep=200, return_mode="median")
            except Exception as e:  # noqa: BLE001
                print(f"d={head_dim} {name} m={m} n={n} w={w} s={s} g={g}: {type(e).__name__}")
                continue
            if base is None:
                base = out.float()
            diff = (out.float() - base).abs().max().item()
            config = {"kv": str(kv_dtype), "m": m, "n": n, "w": w, "s": s, "g": g}
            row = {"d": head_dim, "case": name, **config, "us": ms * 1e3,
                   "tflops": flops / ms / 1e9, "maxdiff": diff}  # fmt: skip
            results.append(row)
            print(
                f"d={head_dim} {kv_dtype} {name:8s} m={m} n={n} w={w} s={s} g={g}: "
                f"{ms * 1e3:8.1f} us {flops / ms / 1e9:6.1f} TFLOP/s diff {diff:.2e}",
                flush=True,
            )
if OUT:
    Path(OUT[0]).write_text(json.dumps(results, indent=1))
