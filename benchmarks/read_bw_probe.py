"""How fast can a kernel that only reads HBM go, against the copy bandwidth the benchmarks use
as the roofline? (CUDA only.) The decode attention kernel reads the KV cache and writes almost
nothing; it reaches ~98% of copy bandwidth (read + write) at W1's shapes. If read-only
streams run much faster than copies, that kernel has headroom; if not, it is at the wall.

    python benchmarks/read_bw_probe.py [--gib 4] [--out results.json]
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
import triton.testing


@triton.jit
def _read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0)
    base = pid.to(tl.int64) * BLOCK * ITERS
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(ITERS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gib", type=float, default=4.0)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    n = int(args.gib * (1 << 30)) // 2
    x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(x)
    nbytes = n * 2

    def rate(fn, moved: int) -> float:
        ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
        return moved / ms / 1e6  # GB/s

    rows = [
        {"kind": "copy (read + write)", "GBps": rate(lambda: dst.copy_(x), 2 * nbytes)},
        {"kind": "torch.sum", "GBps": rate(lambda: x.sum(dtype=torch.float32), nbytes)},
    ]
    for block, iters, warps in [(1024, 16, 4), (2048, 16, 8), (4096, 8, 8), (8192, 4, 8),
                                (4096, 32, 16), (2048, 64, 4)]:  # fmt: skip
        grid = triton.cdiv(n, block * iters)
        out = torch.empty(grid, device="cuda", dtype=torch.float32)
        fn = lambda b=block, i=iters, w=warps, g=grid, o=out: _read_kernel[(g,)](  # noqa: E731
            x, o, n, BLOCK=b, ITERS=i, num_warps=w)  # fmt: skip
        fn()
        assert torch.allclose(out.sum(), x.float().sum(), rtol=1e-3, atol=1.0)
        rows.append(
            {"kind": f"triton read {block} x {iters}, {warps} warps", "GBps": rate(fn, nbytes)}
        )
    for r in rows:
        print(f"{r['kind']:36s} {r['GBps']:8,.0f} GB/s")
    if args.out:
        args.out.write_text(
            json.dumps({"card": torch.cuda.get_device_name(), "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    sys.exit(main())
