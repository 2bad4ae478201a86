"""W1's 256-row decode step over an fp8 (e4m3) or a bf16 KV cache.

`python benchmarks/fp8_decode_probe.py --case time` times the decode kernel at W1's 8B
shapes as the engine runs it (rotary + KV write fused, longest context first) for a few
tile configs of each cache dtype; `--case ncu` launches each config once for Nsight Compute
(`ncu --kernel-name regex:_decode_kernel ...`)."""

import argparse
import json
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from kernel_bench import BLOCK_SIZE, DEVICE, DTYPE, HEAD_DIM, HEADS, KV_HEADS  # noqa: E402

from kernels import paged_attention  # noqa: E402


def w1_inputs(fp8: bool):
    gen = torch.Generator().manual_seed(1)
    lens = torch.randint(64, 1281, (256,), generator=gen)
    per_seq = -(-int(lens.max()) // BLOCK_SIZE)
    blocks = 256 * per_seq
    dtype = torch.float8_e4m3fn if fp8 else DTYPE
    k = torch.randn(blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, device=DEVICE).to(dtype)
    v = torch.randn(blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, device=DEVICE).to(dtype)
    tables = torch.randperm(blocks, device=DEVICE).to(torch.int32).view(256, per_seq)
    seq_lens = lens.to(torch.int32).to(DEVICE)
    q = torch.randn(256, HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    order = torch.argsort(seq_lens, descending=True).to(torch.int32)
    positions = (lens - 1).to(DEVICE)
    slots = tables.gather(1, (positions // BLOCK_SIZE)[:, None])[:, 0].long() * BLOCK_SIZE
    new_kv = torch.randn(256, KV_HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    new = paged_attention.NewTokens(positions, new_kv, new_kv,
                                    torch.rand(2048, HEAD_DIM, device=DEVICE),
                                    slots + positions % BLOCK_SIZE)  # fmt: skip
    kv_bytes = 2 * int(lens.sum()) * KV_HEADS * HEAD_DIM * k.element_size()
    return q, k, v, tables, seq_lens, order, new, kv_bytes


# (block_n, warps, stages) per cache: the default first
CONFIGS = [(64, 4, 2), (64, 4, 3), (128, 4, 2), (32, 4, 3), (64, 8, 2)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--case", choices=["time", "ncu"], default="time")
    p.add_argument("--out")
    args = p.parse_args()
    results = []
    for fp8 in (False, True):
        q, k, v, tables, seq_lens, order, new, kv_bytes = w1_inputs(fp8)
        ref = None
        for n, w, s in CONFIGS:
            kc, vc = k.clone(), v.clone()  # each config writes its own copy's new slots

            def run(n=n, w=w, s=s, kc=kc, vc=vc, q=q, tables=tables, lens=seq_lens,
                    order=order, new=new):  # fmt: skip
                return paged_attention.paged_attention_decode(
                    q, kc, vc, tables, lens, HEAD_DIM**-0.5, num_splits=1, block_n=n,
                    num_warps=w, num_stages=s, order=order, new_tokens=new,
                )  # fmt: skip

            out = run()
            ref = out if ref is None else ref
            if args.case == "ncu":
                torch.cuda.synchronize()
                continue
            ms = triton.testing.do_bench_cudagraph(run, rep=50, return_mode="median")
            diff = (out.float() - ref.float()).abs().max().item()
            row = {"cache": "fp8" if fp8 else "bf16", "n": n, "w": w, "s": s,
                   "us": round(ms * 1e3, 2), "GBps": round(kv_bytes / ms / 1e6),
                   "max_diff_vs_default": diff}  # fmt: skip
            print(row, flush=True)
            results.append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
