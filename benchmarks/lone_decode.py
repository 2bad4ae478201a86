"""A lone request's decode attention on a GPU (the batch-1 layer's call: new key given).

    python benchmarks/lone_decode.py [--out x.json]

Llama-3.2-1B heads (32 / 8 x 64), bf16, block tables of a 131,072-token capacity (the served
default for Llama 3.2: the one-warp kernel's grid has 128 splits), contexts 256-32,768;
CUDA-graph replays cycling over enough disjoint caches to miss L2 (``gemv.py``'s
``graph_us``). Configs: the default (one warp, 32 keys, first tile read before the PDL wait)
against the same in 64 splits (the 33rd session's grid) and four-warp 64-key programs
loading after it. The kernel runs alone here, so the preload's gain (which needs a GEMV
running before it) does not show: this checks that long contexts do not pay for the one-warp
programs; ``gemv.py --cases engine`` times the layer.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
sys.path.append(str(Path(__file__).resolve().parent))

from gemv import graph_us  # noqa: E402

from benchmarks.throughput import git_commit  # noqa: E402
from kernels.paged_attention import NewTokens, paged_attention_decode  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 64, 16
CAPACITY = 131072
CONTEXTS = (256, 1024, 4096, 16384, 32768)
CONFIGS = {
    "default": {},
    "64_splits": {"num_splits": 64},
    "w4_n64_after_wait": {"block_n": 64, "num_warps": 4, "preload": False},
}
MISS_BYTES = 256 << 20


def _case(ctx: int) -> dict:
    """One request's cache, table (capacity CAPACITY), query and new key / value."""
    blocks = -(-ctx // BLOCK)
    k = torch.randn(blocks + 1, BLOCK, KV_HEADS, HEAD_DIM, device="cuda").bfloat16()
    table = torch.zeros(1, CAPACITY // BLOCK, dtype=torch.int32, device="cuda")
    table[0, :blocks] = torch.randperm(blocks, device="cuda").to(torch.int32) + 1
    pos = ctx - 1
    slot = int(table[0, pos // BLOCK]) * BLOCK + pos % BLOCK
    angles = torch.rand(ctx, HEAD_DIM // 2, device="cuda") * 6.0
    new = NewTokens(
        torch.tensor([pos], device="cuda"),
        torch.randn(1, KV_HEADS, HEAD_DIM, device="cuda").bfloat16(),
        torch.randn(1, KV_HEADS, HEAD_DIM, device="cuda").bfloat16(),
        torch.cat([angles.cos(), angles.sin()], dim=1),
        torch.tensor([slot], device="cuda"),
    )
    q = torch.randn(1, HEADS, HEAD_DIM, device="cuda").bfloat16()
    return {"q": q, "k": k, "v": torch.randn_like(k), "table": table,
            "lens": torch.tensor([ctx], dtype=torch.int32, device="cuda"), "new": new}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = []
    for ctx in CONTEXTS:
        kv_bytes = 2 * ctx * KV_HEADS * HEAD_DIM * 2
        copies = max(2, math.ceil(MISS_BYTES / kv_bytes))
        cases = [_case(ctx) for _ in range(copies)]
        for name, kw in CONFIGS.items():

            def call(i: int, kw=kw, cases=cases) -> None:
                c = cases[i]
                paged_attention_decode(c["q"], c["k"], c["v"], c["table"], c["lens"], 0.125,
                                       max_seq_len=CAPACITY, new_tokens=c["new"],
                                       **kw)  # fmt: skip

            us = graph_us(call, copies)
            rows.append({"ctx": ctx, "config": name, "us": us, "kv_GBps": kv_bytes / us / 1e3})
            print(f"  ctx {ctx:6d} {name:<18}: {us:8.2f} us, {kv_bytes / us / 1e3:7.1f} GB/s "
                  "of KV", flush=True)  # fmt: skip
    if args.out:
        meta = {"card": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
                "commit": git_commit(), "command": " ".join(sys.argv)}  # fmt: skip
        Path(args.out).write_text(json.dumps({**meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
