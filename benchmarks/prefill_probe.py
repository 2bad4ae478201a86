"""Prefill attention tile configs: one query head per program vs a GQA group of heads per
program (rows = tokens x heads sharing each K/V tile). CUDA only. Llama-3 heads (32 query,
8 kv; head_dim 128 as the 8B, 64 as the 1B), bf16, block_size 16, shuffled block tables;
cases: a W1 16384-token step of whole prompts of 64-1024 tokens, one 2048-token prompt, and
8 chunks of 512 tokens after 1024 cached ones. Prints each config's time, TFLOP/s (causal
FLOPs) and max difference from the first config's output. ``--fp8``: over an e4m3 copy of
the caches, against the bf16 caches, in the engine's default config only. ``--long``: long
prompts instead (one of 4096 / 16384 tokens, a 2048-token chunk after 14336 cached), larger
tiles, the last query tiles launched first (``lf``), and torch's SDPA (flash / cuDNN
backends, keys and values repeated per query head, contiguous) on the whole prompts as peers.

    python benchmarks/prefill_probe.py [out.json] [--fp8 | --long]
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
LONG = "--long" in sys.argv
if LONG:
    cases = {"n1_4096": ([4096], [4096]), "n1_16384": ([16384], [16384]),
             "chunk_2048_after_14336": ([2048], [16384])}  # fmt: skip
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
configs = [(*c, False) for c in configs] + [(32, 32, 4, 4, 4, True), (32, 64, 8, 2, 4, True)]
if LONG:  # (tokens, key tile, warps, stages, heads per program, last tiles first)
    configs = [(32, 32, 4, 4, 4, False), (32, 32, 4, 4, 4, True), (32, 64, 4, 3, 4, True),
               (32, 64, 8, 3, 4, True), (32, 128, 8, 2, 4, True), (32, 64, 8, 4, 4, True),
               (64, 64, 8, 3, 2, True), (128, 64, 8, 3, 1, True), (128, 128, 8, 2, 1, True),
               (64, 64, 4, 3, 1, True), (64, 64, 8, 2, 4, True), (64, 32, 8, 3, 4, True),
               (16, 64, 4, 3, 4, True), (128, 32, 8, 3, 1, True)]  # fmt: skip
FP8 = "--fp8" in sys.argv
OUT = [a for a in sys.argv[1:] if not a.startswith("--")]
kv_dtypes = (torch.bfloat16, torch.float8_e4m3fn) if FP8 else (torch.bfloat16,)
results = []


def sdpa_peers(q: torch.Tensor, head_dim: int, flops: float, name: str) -> None:
    """torch's SDPA on one whole causal prompt, [1, heads, tokens, head_dim], kv repeated."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qt = q.transpose(0, 1).unsqueeze(0)
    kt = torch.randn_like(qt)
    vt = torch.randn_like(qt)
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):

        def run(backend=backend):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)

        try:
            run()
            ms = triton.testing.do_bench(run, warmup=25, rep=200, return_mode="median")
        except Exception as e:  # noqa: BLE001
            print(f"d={head_dim} {name} sdpa {backend.name}: {type(e).__name__}: {e}"[:200])
            continue
        results.append({"d": head_dim, "case": name, "peer": f"sdpa_{backend.name}",
                        "us": ms * 1e3, "tflops": flops / ms / 1e9})  # fmt: skip
        print(f"d={head_dim} {name:8s} sdpa {backend.name}: {ms * 1e3:8.1f} us "
              f"{flops / ms / 1e9:6.1f} TFLOP/s", flush=True)  # fmt: skip


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
        if LONG and q_lens == seq_lens:
            sdpa_peers(q, head_dim, flops, name)
        for m, n, w, s, g, lf in [(None,) * 5 + (False,)] if FP8 else configs:  # fp8: default
            args = (q, k, v, tables, sl, qsl, head_dim**-0.5)

            def run(m=m, n=n, w=w, s=s, g=g, lf=lf, args=args):
                tiles = {} if FP8 else dict(block_m=m, block_n=n, num_warps=w, num_stages=s,
                                            group=g, longest_first=lf)  # fmt: skip
                return prefill_attention(*args, **tiles)

            try:
                out = run()
                ms = triton.testing.do_bench(run, warmup=25, rep=200, return_mode="median")
            except Exception as e:  # noqa: BLE001
                print(f"d={head_dim} {name} m={m} n={n} w={w} s={s} g={g} lf={lf}: "
                      f"{type(e).__name__}")  # fmt: skip
                continue
            if base is None:
                base = out.float()
            diff = (out.float() - base).abs().max().item()
            config = {"kv": str(kv_dtype), "m": m, "n": n, "w": w, "s": s, "g": g, "lf": lf}
            row = {"d": head_dim, "case": name, **config, "us": ms * 1e3,
                   "tflops": flops / ms / 1e9, "maxdiff": diff}  # fmt: skip
            results.append(row)
            print(
                f"d={head_dim} {kv_dtype} {name:8s} m={m} n={n} w={w} s={s} g={g} lf={lf:d}: "
                f"{ms * 1e3:8.1f} us {flops / ms / 1e9:6.1f} TFLOP/s diff {diff:.2e}",
                flush=True,
            )
if OUT:
    Path(OUT[0]).write_text(json.dumps(results, indent=1))
