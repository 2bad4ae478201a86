"""The int4 (W4A16) matmul at the Llama-3-8B linear shapes against bf16 ``F.linear`` (CUDA).

    python benchmarks/int4_probe.py [--m 1,2,16,256] [--shapes qkv,o] [--sweep gemv,mma]
        [--act-order] [--out x.json]

Each case times CUDA-graph replays over enough copies of the weights that none stays in L2
(H200: 50 MB), so decode shapes read from HBM as in the engine. Reports us per call, the
int4 weight bytes' GB/s and the ratio to bf16, for what ``w4a16_matmul`` picks and for
each kernel that can take the rows (the one-row GEMV, the tensor-core kernel, the
dequantize pass plus cuBLAS), to place ``GEMV_MAX_M`` / ``MMA_MAX_M``. ``--sweep`` also
times tile configs around the defaults (``default_config``, ``default_mma_config``).
``--act-order`` also times the default behind the input gather an act-order checkpoint's
layer runs first (GPTQ desc_act: ``layers/prequantized.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # gemv's timing

from gemv import graph_us  # noqa: E402

from kernels.quant_int4 import (  # noqa: E402
    W4A16Config,
    default_config,
    int4_dequantize,
    w4a16_gemv,
    w4a16_matmul,
)
from kernels.quant_int4_half2 import half2_config, w4a16_gemv_half2  # noqa: E402
from kernels.quant_int4_mma import MMA_BLOCK_K, default_mma_config, w4a16_mma  # noqa: E402
from vllm_runner.model.layers.int4 import quantize_int4  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
L2_BYTES = 256 << 20  # cycle through at least this many weight bytes per replay set


def sweep_configs(kernel: str, m: int, n: int, k: int) -> list[W4A16Config | None]:
    """A kernel's default (None) and, swept, the tiles around it."""
    if kernel == "gemv":
        base = default_config(m, k, 128)
        grid = [W4A16Config(base.block_m, bn, 128, split, warps) for bn in (16, 32, 64, 128)
                for split in (1, 2, 4, 8) for warps in (2, 4)]  # fmt: skip
    elif kernel == "half2":
        base = half2_config(k)
        grid = [W4A16Config(1, bn, bk, split, warps) for bn in (8, 16, 32, 64)
                for bk in (256, 512, 1024) for split in (1, 2, 4) for warps in (2, 4)]  # fmt: skip
    elif kernel == "mma":
        base = default_mma_config(m, n, k, 128)
        grid = [W4A16Config(bm, bn, MMA_BLOCK_K, split, warps)
                for bm in dict.fromkeys((base.block_m, min(64, 2 * base.block_m)))
                for bn in (32, 64, 128) for split in (1, 2, 4, 8) for warps in (4, 8)]  # fmt: skip
    else:
        return [None]
    return [None, *dict.fromkeys(c for c in grid if c != base)]


def kernels_for(m: int) -> list[str]:
    """The one-row GEMV up to 8 rows (its packed-half variant at one), the tensor-core
    kernel up to 256 (with and without its PTX unpack), dequantize + cuBLAS from 2 rows on;
    "default": what ``w4a16_matmul`` picks."""
    names = ["default"] + ["gemv"] * (m <= 8) + ["half2"] * (m == 1)
    names += ["mma", "mma_float"] * (m <= 256) + ["dequant"] * (m >= 2)
    return names


def call(kernel: str, x, q, cfg):
    if kernel == "gemv":
        return w4a16_gemv(x, *q, 128, None, cfg)
    if kernel == "half2":
        return w4a16_gemv_half2(x, *q, 128, None, cfg)
    if kernel in ("mma", "mma_float"):  # (mma_float: without the PTX unpack)
        return w4a16_mma(x, *q, 128, None, cfg, magic=kernel == "mma")
    if kernel == "dequant":
        return F.linear(x, int4_dequantize(*q, 128, x.shape[-1], x.dtype))
    return w4a16_matmul(x, *q, 128)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", default="1,2,4,8,16,32,64,128,256,4096")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--sweep", default="", help="kernels to sweep tiles of: gemv,half2,mma")
    p.add_argument("--act-order", action="store_true", help="also time gather + matmul")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    rows = []
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        q, scale, zero = quantize_int4(w, 128)
        int4_bytes = q.numel() * 4 + scale.numel() * 4 + zero.numel()
        copies = max(2, -(-L2_BYTES // int4_bytes))
        qs = [(q.clone(), scale.clone(), zero.clone()) for _ in range(copies)]
        bf_copies = max(2, -(-L2_BYTES // (w.numel() * 2)))
        ws = [w.clone() for _ in range(bf_copies)]
        for m in (int(v) for v in args.m.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            bf16 = graph_us(lambda i, x=x, ws=ws: F.linear(x, ws[i]), len(ws))
            for kernel in kernels_for(m):
                swept = kernel in args.sweep.split(",")
                for cfg in sweep_configs(kernel, m, n, k) if swept else [None]:
                    try:
                        us = graph_us(lambda i, kn=kernel, c=cfg, x=x, qs=qs: call(kn, x, qs[i], c),
                                      len(qs))  # fmt: skip
                    except Exception as exc:  # noqa: BLE001  (a config the card cannot run)
                        print(f"{name} m={m} {kernel} {cfg}: {type(exc).__name__}", flush=True)
                        continue
                    row = {"shape": name, "m": m, "kernel": kernel,
                           "config": str(cfg or "default"), "int4_us": us, "bf16_us": bf16,
                           "int4_GBps": int4_bytes / us / 1e3, "speedup": bf16 / us,
                           "bf16_GBps": w.numel() * 2 / bf16 / 1e3}  # fmt: skip
                    if args.act_order and kernel == "default":  # the layer's input gather
                        perm = torch.randperm(k, device="cuda").to(torch.int32)
                        row["act_order_us"] = graph_us(
                            lambda i, x=x, qs=qs, p=perm: call(
                                "default", x.index_select(-1, p), qs[i], None),
                            len(qs),
                        )  # fmt: skip
                    rows.append(row)
                    print(f"{name:8} m={m:5} {kernel:8} {us:8.1f} us "
                          f"({row['int4_GBps']:6.0f} GB/s) bf16 {bf16:8.1f} us  x{bf16 / us:5.2f}"
                          f"  {row['config']}", flush=True)  # fmt: skip
        del qs, ws
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps({"card": torch.cuda.get_device_name(), "rows": rows},
                                             indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
