"""RMSNorm (+ residual) warps at the engine's shapes, each timed in a CUDA graph (as decode
steps run them; greedy argmax: argmax_probe.py). CUDA only.

    python benchmarks/elementwise_probe.py [out.json]
"""

import json
import sys
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kernels.rms_norm as rn  # noqa: E402
from kernels.pdl import pdl_launch  # noqa: E402


def graph_us(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3


def rms(x, w, r, out, res_out, warps):
    rn._rms_norm_kernel[(x.shape[0],)](
        x, r, w, out, res_out, 1e-5, x.stride(0), r.stride(0), out.stride(0), res_out.stride(0),
        HIDDEN=x.shape[1], BLOCK=triton.next_power_of_2(x.shape[1]), HAS_RESIDUAL=True,
        num_warps=warps, **pdl_launch(x.device),
    )  # fmt: skip


rows = []
dev = torch.device("cuda")
for hidden in (2048, 4096):
    for t in (1, 256, 16384):
        x, r = (torch.randn(t, hidden, device=dev, dtype=torch.bfloat16) for _ in range(2))
        w = torch.randn(hidden, device=dev, dtype=torch.bfloat16)
        out, res_out = torch.empty_like(x), torch.empty_like(x)
        ref = rn.rms_norm(x, w, 1e-5, r)
        for warps in (2, 4, 8, 16, 32):
            rms(x, w, r, out, res_out, warps)
            same = torch.equal(out, ref[0]) and torch.equal(res_out, ref[1])
            us = graph_us(lambda warps=warps, a=(x, w, r, out, res_out): rms(*a, warps))
            rows.append(dict(kernel="rms_norm", hidden=hidden, t=t, warps=warps, us=us, same=same))
            print(f"rms_norm h={hidden} t={t:5d} warps={warps:2d}: {us:7.2f} us same={same}")
if len(sys.argv) > 1:
    Path(sys.argv[1]).write_text(json.dumps({"card": torch.cuda.get_device_name(), "rows": rows}))
