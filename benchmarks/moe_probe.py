"""The fused MoE kernel (kernels/fused_moe.py) against the torch grouped path
(kernels/reference.py) at Mixtral-8x7B and Qwen3-30B-A3B layer shapes, bf16, CUDA.

    python benchmarks/moe_probe.py [--tokens 1,16,256,4096] [--sweep] [--align] [--out x.json]

Per (shape, token count): the kernel replayed in a CUDA graph (how the engine's decode and
piecewise graphs run it) and launched eagerly, the torch path eagerly (it reads the expert
counts on the host: no graph), each the median of repeats in us; the kernel's TFLOP/s
(6 * pairs * hidden * inter) and GB/s over the weights of the experts the routing touched,
against the H200's 989 TFLOP/s bf16 and 4.8 TB/s. ``--sweep`` also times other tile sizes
(to pick ``kernels.fused_moe.choose_tiles``); the error column is the max abs difference
from the fp32 reference. ``--align`` times only the routing step instead: the torch ops
(``kernels.reference.align_pairs``) against the Triton launches (``kernels.moe_align``) at
chunks of 256 to 2048 pairs a program (``*``: ``moe_align.CHUNK``), each checked against the
torch outputs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # gemv's timing

from gemv import graph_us  # noqa: E402

from kernels import moe_align, reference  # noqa: E402
from kernels.fused_moe import MoeTiles, choose_tiles, fused_moe  # noqa: E402

SHAPES = {  # hidden, inter, experts, top_k
    "mixtral-8x7b": (4096, 14336, 8, 2),
    "qwen3-30b-a3b": (2048, 768, 128, 8),
}
PEAK_TFLOPS, PEAK_GBS = 989.0, 4800.0  # H200 SXM, dense bf16 / HBM3e


def eager_us(fn, reps: int = 15) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times) * 1e3


def sweep_tiles(num_pairs: int, num_experts: int) -> list[MoeTiles]:
    tiles = [choose_tiles(num_pairs, num_experts, torch.bfloat16)]
    for bm in (16, 32, 64, 128):
        for bn in (64, 128):
            for warps in (4, 8):
                for group_m in (1, 8) if bm >= 64 else (1,):
                    tiles.append(MoeTiles(bm, bn, 64, warps, 3, group_m))
    return list(dict.fromkeys(tiles))


def time_case(
    shape: str, num_tokens: int, w13: torch.Tensor, w2: torch.Tensor, top_k: int, sweep: bool
) -> list[dict]:
    num_experts, two_inter, hidden = w13.shape
    inter = two_inter // 2
    x = torch.randn(num_tokens, hidden, device="cuda").bfloat16()
    logits = torch.randn(num_tokens, num_experts, device="cuda")
    weights, ids = reference.moe_route(logits, top_k, renormalize=True)
    touched = ids.unique().numel()
    pairs = num_tokens * top_k
    flops = 6 * pairs * hidden * inter
    weight_bytes = touched * 3 * inter * hidden * 2
    want = reference.fused_moe(x.float(), w13.float(), w2.float(), weights, ids)
    torch_us = eager_us(lambda: reference.fused_moe(x, w13, w2, weights, ids))
    rows = []
    for tiles in sweep_tiles(pairs, num_experts) if sweep else [None]:

        def run(i: int = 0, t: MoeTiles | None = tiles) -> torch.Tensor:
            return fused_moe(x, w13, w2, weights, ids, t)

        try:
            err = (run().float() - want).abs().max().item()
            graph = graph_us(run, 1)
            eager = eager_us(run)
        except Exception as exc:  # noqa: BLE001  (tiles the card cannot run)
            print(f"{shape} tokens={num_tokens} {tiles}: {type(exc).__name__}", flush=True)
            continue
        row = {
            "shape": shape, "tokens": num_tokens, "experts_touched": touched,
            "tiles": str(tiles or choose_tiles(pairs, num_experts, torch.bfloat16)),
            "kernel_graph_us": graph, "kernel_eager_us": eager, "torch_us": torch_us,
            "speedup_vs_torch": torch_us / graph, "tflops": flops / graph / 1e6,
            "weight_gbs": weight_bytes / graph / 1e3, "max_abs_err": err,
        }  # fmt: skip
        rows.append(row)
        print(
            f"{shape:14s} T={num_tokens:5d} experts={touched:3d} graph {graph:9.1f} us eager "
            f"{eager:9.1f} us torch {torch_us:9.1f} us x{row['speedup_vs_torch']:6.2f} "
            f"{row['tflops']:6.1f} TFLOP/s ({100 * row['tflops'] / PEAK_TFLOPS:4.1f}%) "
            f"{row['weight_gbs']:7.0f} GB/s ({100 * row['weight_gbs'] / PEAK_GBS:4.1f}%) "
            f"err {err:.3g} {row['tiles']}",
            flush=True,
        )
    return rows


def time_align(shape: str, num_tokens: int, num_experts: int, top_k: int) -> list[dict]:
    """The routing step at fused_moe's tile size: torch ops vs the Triton launches."""
    ids = torch.rand(num_tokens, num_experts, device="cuda").topk(top_k, dim=-1).indices
    block_m = choose_tiles(ids.numel(), num_experts, torch.bfloat16).block_m
    want = reference.align_pairs(ids, num_experts, block_m)
    torch_graph = graph_us(lambda i: reference.align_pairs(ids, num_experts, block_m), 1)
    torch_eager = eager_us(lambda: reference.align_pairs(ids, num_experts, block_m))
    rows = []
    for chunk in (256, 512, 1024, 2048):

        def run(i: int = 0, c: int = chunk) -> tuple[torch.Tensor, ...]:
            return moe_align.align_pairs(ids, num_experts, block_m, chunk=c)

        exact = all(torch.equal(g, w) for g, w in zip(run(), want, strict=True))
        graph, eager = graph_us(run, 1), eager_us(run)
        launches = 1 if ids.numel() <= chunk else 2
        row = {
            "shape": shape, "tokens": num_tokens, "block_m": block_m, "chunk": chunk,
            "launches": launches, "triton_graph_us": graph, "triton_eager_us": eager,
            "torch_graph_us": torch_graph, "torch_eager_us": torch_eager, "exact": exact,
        }  # fmt: skip
        rows.append(row)
        star = "*" if chunk == moe_align.CHUNK else " "
        print(
            f"align {shape:14s} T={num_tokens:5d} block_m={block_m:3d} chunk={chunk:4d}{star} "
            f"({launches} launch) graph {graph:7.1f} us eager {eager:7.1f} us | torch graph "
            f"{torch_graph:7.1f} us eager {torch_eager:7.1f} us | exact {exact}",
            flush=True,
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="1,16,256,4096")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--align", action="store_true", help="time the routing step only")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = []
    for shape in args.shapes.split(","):
        hidden, inter, num_experts, top_k = SHAPES[shape]
        torch.manual_seed(0)
        if args.align:
            for num_tokens in (int(t) for t in args.tokens.split(",")):
                rows += time_align(shape, num_tokens, num_experts, top_k)
            continue
        w13 = (torch.randn(num_experts, 2 * inter, hidden, device="cuda") * hidden**-0.5).bfloat16()
        w2 = (torch.randn(num_experts, hidden, inter, device="cuda") * inter**-0.5).bfloat16()
        for num_tokens in (int(t) for t in args.tokens.split(",")):
            rows += time_case(shape, num_tokens, w13, w2, top_k, args.sweep)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                              "rows": rows}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
