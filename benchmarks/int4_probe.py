"""The int4 (W4A16) matmul at the Llama-3-8B linear shapes against bf16 ``F.linear`` (CUDA).

    python benchmarks/int4_probe.py [--m 1,16,256,4096] [--sweep] [--act-order] [--out x.json]

Each case times CUDA-graph replays over enough copies of the weights that none stays in L2
(H200: 50 MB), so decode shapes read from HBM as in the engine. Reports us per call, the
weight bytes' GB/s and the ratio to bf16. ``--sweep`` also times a few tile configs per
shape (to pick ``kernels.quant_int4.default_config``, the GEMV's). Rows past GEMV_MAX_M time
the dequantize pass plus cuBLAS. ``--act-order`` also times each call behind the input
gather an act-order checkpoint's layer runs first (GPTQ desc_act: ``layers/prequantized.py``).
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
    GEMV_MAX_M,
    W4A16Config,
    default_config,
    w4a16_matmul,
)
from vllm_runner.model.layers.int4 import quantize_int4  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
L2_BYTES = 256 << 20  # cycle through at least this many weight bytes per replay set


def sweep_configs(m: int, n: int, k: int) -> list[W4A16Config | None]:
    """The GEMV's tiles for rows up to GEMV_MAX_M (larger M dequantizes: no config)."""
    if m > GEMV_MAX_M:
        return [None]
    configs = [default_config(m, k, 128)]
    for bn in (16, 32, 64, 128):
        for split in (1, 2, 4, 8):
            for warps in (2, 4):
                configs.append(W4A16Config(configs[0].block_m, bn, 128, split, warps))
    return list(dict.fromkeys(configs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", default="1,16,256,4096")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--act-order", action="store_true", help="also time gather + matmul")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    rows = []
    for name, (n, k) in SHAPES.items():
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
            configs = sweep_configs(m, n, k) if args.sweep else [None]
            for cfg in configs:
                try:
                    us = graph_us(
                        lambda i, c=cfg, x=x, qs=qs: w4a16_matmul(x, *qs[i], 128, config=c),
                        len(qs),
                    )
                except Exception as exc:  # noqa: BLE001  (a config the card cannot run)
                    print(f"{name} m={m} {cfg}: {type(exc).__name__}", flush=True)
                    continue
                row = {"shape": name, "m": m, "config": str(cfg or "default"), "int4_us": us,
                       "bf16_us": bf16, "int4_GBps": int4_bytes / us / 1e3,
                       "bf16_GBps": w.numel() * 2 / bf16 / 1e3, "speedup": bf16 / us}  # fmt: skip
                if args.act_order:  # the layer's gather of its inputs into group order
                    perm = torch.randperm(k, device="cuda").to(torch.int32)
                    row["act_order_us"] = graph_us(
                        lambda i, c=cfg, x=x, qs=qs, p=perm: w4a16_matmul(
                            x.index_select(-1, p), *qs[i], 128, config=c),
                        len(qs),
                    )  # fmt: skip
                    print(f"{name:8} m={m:5} act order {row['act_order_us']:8.1f} us", flush=True)
                rows.append(row)
                gbps = row["int4_GBps"]
                print(f"{name:8} m={m:5} int4 {us:8.1f} us ({gbps:6.0f} GB/s) bf16 {bf16:8.1f} us"
                      f"  x{bf16 / us:5.2f}  {row['config']}", flush=True)  # fmt: skip
        del qs, ws
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps({"card": torch.cuda.get_device_name(), "rows": rows},
                                             indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
