"""Batch-1 projections on a GPU: the one-row GEMV (kernels/gemv.py) vs cuBLAS, and engines
with the fused one-row decoder layers on and off.

    python benchmarks/gemv.py [--cases tiles,fusions,chain,engine] [--models 1b,8b] [--out x.json]

- tiles: each Llama-3.2-1B / Llama-3-8B projection at batch 1 (and the LM head): the GEMV
  over tile configs vs F.linear (gated: + silu_and_mul). Timed as CUDA-graph replays that
  cycle through enough weight copies to miss L2, as a decode step reads each weight once.
- fusions: bf16 and int8 weights at default tiles: the GEMV with the decode layer's fusion
  as the engine runs it (qkv, gate_up: the RMSNorm; o, down: the residual add), with the
  norm as its own kernel, with the norm forced into the kernel, alone, and (bf16) the
  cuBLAS kernels the engine ran before (qkv: RMSNorm + F.linear; o, down: F.linear, the add
  left to the next norm; gate_up: RMSNorm with the residual add + F.linear + silu_and_mul).
- chain: a whole batch-1 decode step's layers (the GEMVs with their fusions and the decode
  attention) on distinct weights in one CUDA graph, us per layer, for tile variants.
- engine: batch-1 decode tok/s (128-token prompt, 256 new, prefill removed) with the fused
  one-row layers on and off (``VLLM_RUNNER_GEMV=0``), against the bandwidth roofline.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
sys.path.append(str(Path(__file__).resolve().parent))

from quant_offload import batch1_tok_s, generate  # noqa: E402
from workloads import (  # noqa: E402
    build_random_llama,
    copy_bandwidth,
    free_memory,
    model_vocab,
    random_workload,
    weight_numel,
)

from benchmarks.throughput import git_commit  # noqa: E402

L2_MISS_BYTES = 256 << 20  # weight copies cycled per graph: well over an H100 / H200 L2
# (role, n, k): n output rows (gate_up: of each half), k inputs
SHAPES = {
    "1b": [("qkv", 3072, 2048), ("o", 2048, 2048), ("gate_up", 8192, 2048),
           ("down", 2048, 8192), ("lm_head", 128256, 2048)],
    "8b": [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 14336, 4096),
           ("down", 4096, 14336), ("lm_head", 128256, 4096)],
}  # fmt: skip


def graph_us(fn, copies: int, reps: int = 15) -> float:
    """Microseconds per call of ``fn(i)``, i cycling over ``copies``, replayed in a graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm outside the capture
        for i in range(copies):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            fn(i)
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times) * 1e3 / copies


def operands(role: str, n: int, k: int):
    rows = 2 * n if role == "gate_up" else n
    copies = max(2, math.ceil(L2_MISS_BYTES / (rows * k * 2)))
    ws = [(torch.randn(rows, k, device="cuda") * k**-0.5).bfloat16() for _ in range(copies)]
    x = torch.randn(1, k, device="cuda").bfloat16()
    return ws, x, copies


TILE_CONFIGS = [
    (1, 1024, 4, 2), (2, 512, 4, 2), (2, 1024, 4, 2), (2, 2048, 8, 2), (4, 256, 4, 2),
    (4, 512, 4, 2), (4, 512, 4, 1), (4, 1024, 8, 2), (8, 256, 4, 2), (8, 256, 4, 1),
    (8, 512, 8, 2), (16, 128, 4, 2), (16, 256, 8, 2),
]  # fmt: skip


def bench_tiles(args, report: dict) -> None:
    from kernels.gemv import GemvTiles

    configs = [None] + [GemvTiles(*c) for c in TILE_CONFIGS]
    report["tiles"] = [row for model in args.models for role, n, k in SHAPES[model]
                       for row in _tiles_of_shape(model, role, n, k, configs)]  # fmt: skip
    free_memory()


def _tiles_of_shape(model: str, role: str, n: int, k: int, configs: list) -> list[dict]:
    from kernels.activation import silu_and_mul
    from kernels.gemv import default_tiles, linear_one_row

    ws, x, copies = operands(role, n, k)
    gated = role == "gate_up"
    nbytes = ws[0].numel() * 2
    if gated:
        cublas = graph_us(lambda i: silu_and_mul(F.linear(x, ws[i])), copies)
    else:
        cublas = graph_us(lambda i: F.linear(x, ws[i]), copies)
    rows = []
    for cfg in configs:
        try:
            us = graph_us(lambda i, c=cfg: linear_one_row(x, ws[i], gated=gated, tiles=c), copies)
        except Exception as e:  # one bad config must not end the sweep
            print(f"  {model} {role} {cfg}: failed {e!r}"[:300], flush=True)
            continue
        used = cfg or default_tiles(n, k, gated)
        rows.append({"model": model, "role": role, "n": n, "k": k, "default": cfg is None,
                     "tiles": str(used), "us": us, "GBps": nbytes / us / 1e3,
                     "cublas_us": cublas, "vs_cublas": cublas / us})  # fmt: skip
        print(f"  {model} {role:<8} {'default ' if cfg is None else ''}{used}: "
              f"{us:7.1f} us {nbytes / us / 1e3:6,.0f} GB/s, cuBLAS {cublas:7.1f} us "
              f"({cublas / us:.2f}x)", flush=True)  # fmt: skip
    return rows


def bench_fusions(args, report: dict) -> None:
    report["fusions"] = [
        _fusion_of_shape(model, role, n, k, wdtype)
        for wdtype in ("bf16", "int8")
        for model in args.models
        for role, n, k in SHAPES[model][:4]
    ]
    free_memory()


def _fusion_of_shape(model: str, role: str, n: int, k: int, wdtype: str) -> dict:
    """us per call of: the GEMV with the layer's fusion (qkv, gate_up: the norm; o, down: the
    residual), the norm as its own kernel before the plain GEMV (qkv, gate_up), the plain
    GEMV alone, and (bf16) the unfused kernels the engine ran before (cuBLAS)."""
    import kernels.gemv
    from kernels.activation import silu_and_mul
    from kernels.gemv import linear_one_row
    from kernels.quant_matmul import w8a16_matmul
    from kernels.rms_norm import rms_norm
    from vllm_runner.model.layers.quant import quantize_int8

    ws, x, copies = operands(role, n, k)
    scales = None
    if wdtype == "int8":
        ws, scales = zip(*(quantize_int8(w) for w in ws), strict=True)
    g = (torch.rand(k, device="cuda") + 0.5).bfloat16()
    res_in, res_out = torch.randn_like(x), torch.randn(1, n, device="cuda").bfloat16()
    gated, norm = role == "gate_up", role in ("qkv", "gate_up")

    def gemv(i: int, x: torch.Tensor, **kw) -> torch.Tensor:
        if scales is None:
            return linear_one_row(x, ws[i], gated=gated, **kw)
        return w8a16_matmul(x, ws[i], scales[i], gated=gated, **kw)

    def cublas(i: int) -> torch.Tensor:
        h = rms_norm(x, g, 1e-5, res_in if gated else None)[0] if norm else x
        y = F.linear(h, ws[i])
        return silu_and_mul(y) if gated else y

    fusion = {"norm": (g, 1e-5)} if norm else {"residual": res_out}
    times = {
        "fused": graph_us(lambda i: gemv(i, x, **fusion), copies),
        "plain": graph_us(lambda i: gemv(i, x), copies),
    }
    if norm:
        times["norm_kernel"] = graph_us(lambda i: gemv(i, rms_norm(x, g, 1e-5)[0]), copies)
        # the norm inside the GEMV even where kernels.gemv.norm_in_kernel runs it apart
        rule = kernels.gemv.norm_in_kernel
        kernels.gemv.norm_in_kernel = lambda k, gated: True
        try:
            times["norm_in_kernel"] = graph_us(lambda i: gemv(i, x, **fusion), copies)
        finally:
            kernels.gemv.norm_in_kernel = rule
    if scales is None:
        times["cublas"] = graph_us(cublas, copies)
    shown = ", ".join(f"{name} {us:6.1f} us" for name, us in times.items())
    print(f"  {wdtype} {model} {role:<8} {shown}", flush=True)
    return {
        "weights": wdtype,
        "model": model,
        "role": role,
        **{f"{k}_us": v for k, v in times.items()},
    }


# chain variants: (name, decode attention between qkv and o, {role: (block_n, block_k or
# "K", warps, prefetch)}); block_k "K": the whole row in one tile, so each program requests
# all of its weights before the PDL wait
CHAIN_VARIANTS = [
    ("default", True, {}),
    ("no attention", False, {}),
    ("whole rows qkv,o", True, {"qkv": (2, "K", 4, 0), "o": (2, "K", 4, 0)}),
]  # fmt: skip
LAYERS = {"1b": 16, "8b": 32}
HEADS = {"1b": (32, 8, 64), "8b": (32, 8, 128)}  # query heads, kv heads, head size


def bench_chain(args, report: dict) -> None:
    """A whole batch-1 decode step's layers (qkv with the norm, decode attention over 512
    cached tokens, o + residual, gate_up with the norm, down + residual) on distinct random
    weights, in one CUDA graph: us per layer at the default tiles, without the attention, and
    with some projections reading whole rows per tile (``CHAIN_VARIANTS``)."""
    report["chain"] = [row for model in args.models for row in _chain_of_model(model)]
    free_memory()


def _chain_of_model(model: str) -> list[dict]:
    from kernels.gemv import GemvTiles, default_tiles, gemv
    from kernels.paged_attention import NewTokens, paged_attention_decode

    rows = []
    shapes = {role: (n, k) for role, n, k in SHAPES[model][:4]}
    hq, hkv, d = HEADS[model]
    layers = [
        {role: (torch.randn(2 * n if role == "gate_up" else n, k, device="cuda") * k**-0.5)
         .bfloat16() for role, (n, k) in shapes.items()}
        for _ in range(LAYERS[model])
    ]  # fmt: skip
    hidden = shapes["o"][0]
    g = (torch.rand(hidden, device="cuda") + 0.5).bfloat16()
    cache = torch.randn(64, 16, hkv, d, device="cuda").bfloat16()
    table = torch.arange(32, device="cuda", dtype=torch.int32)[None]
    lens = torch.full((1,), 512, device="cuda", dtype=torch.int32)
    pos = torch.full((1,), 511, device="cuda", dtype=torch.long)  # the new token's position / slot
    cos_sin = torch.randn(1024, d, device="cuda")
    x0 = torch.randn(1, hidden, device="cuda").bfloat16()
    weight_bytes = sum(w.numel() * 2 for layer in layers for w in layer.values())

    def step(attention: bool, tiles: dict) -> None:
        order = [(i, role) for i in range(len(layers)) for role in shapes]
        x = x0
        for i, role in order:
            n, k = shapes[role]
            w = layers[i][role]
            out = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
            t = default_tiles(n, k, role == "gate_up")
            if role in tiles:
                bn, bk, warps, pf = tiles[role]
                t = GemvTiles(bn, k if bk == "K" else bk, warps, pf)
            kw = {"prefetch": t.prefetch}
            if role == "qkv":
                gemv(x, w, out, t.block_n, t.block_k, t.num_warps, norm=(g, 1e-5), **kw)
                q = out[:, : hq * d].view(1, hq, d)
                h = q.reshape(1, hq * d)
                if attention:  # rotary and the KV write inside, as the engine runs it
                    k_new = out[:, hq * d : (hq + hkv) * d].view(1, hkv, d)
                    v_new = out[:, (hq + hkv) * d :].view(1, hkv, d)
                    new = NewTokens(pos, k_new, v_new, cos_sin, pos)
                    attn = paged_attention_decode(q, cache, cache, table, lens, d**-0.5,
                                                  max_seq_len=512, new_tokens=new)  # fmt: skip
                    h = attn.view(1, hq * d)
            elif role == "o":
                gemv(h, w, out, t.block_n, t.block_k, t.num_warps, residual=x, **kw)
                x = out
            elif role == "gate_up":
                gemv(x, w, out, t.block_n, t.block_k, t.num_warps, gated=True,
                     norm=(g, 1e-5), **kw)  # fmt: skip
                h = out
            else:
                gemv(h, w, out, t.block_n, t.block_k, t.num_warps, residual=x, **kw)
                x = out

    for name, attention, tiles in CHAIN_VARIANTS:
        try:
            us = graph_us(lambda i, a=attention, t=tiles: step(a, t), 1, reps=20)
        except Exception as e:  # one bad variant must not end the sweep
            print(f"  {model} {name}: failed {e!r}"[:300], flush=True)
            continue
        per_layer = us / len(layers)
        rows.append({"model": model, "variant": name, "us_step": us, "us_layer": per_layer,
                     "TBps": weight_bytes / us / 1e6})  # fmt: skip
        print(f"  {model} {name:<26}: {per_layer:6.2f} us/layer "
              f"({weight_bytes / us / 1e6:.2f} TB/s of weights)", flush=True)  # fmt: skip
    return rows


def bench_engine(args, report: dict) -> None:
    from vllm_runner import LLM

    bw = report["copy_bandwidth_GBps"] * 1e9
    rows = []
    for model in args.models:
        model_dir = build_random_llama(model, Path(args.model_root), "cuda", 0)
        vocab = model_vocab(model_dir)
        b1 = random_workload(1, vocab, 128, 128, 256, 2)
        roof = bw / (weight_numel(model_dir) * 2)
        for gemv in args.gemv.split(","):
            os.environ["VLLM_RUNNER_GEMV"] = gemv  # read when the decode graphs are captured
            llm = LLM(model=model_dir, dtype="bfloat16", device="cuda", max_model_len=400)
            generate(llm, b1.salted(50))  # warm-up
            tok_s = batch1_tok_s(llm, b1, args.repeats)
            rows.append({"model": model, "fused_one_row": gemv == "1", "tok_s": tok_s,
                         "roofline_tok_s": roof, "fraction": tok_s / roof})  # fmt: skip
            print(
                f"  {model} one-row GEMV layers {'on ' if gemv == '1' else 'off'}: "
                f"{tok_s:7.1f} tok/s, {tok_s / roof:.0%} of roofline {roof:.1f}",
                flush=True,
            )
            del llm
            free_memory()
    os.environ.pop("VLLM_RUNNER_GEMV", None)
    report["engine_batch1"] = rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="tiles,fusions,engine")
    p.add_argument("--models", default="1b,8b")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gemv", default="1,0", help="engine case: one-row GEMV layers on (1) / off")
    p.add_argument("--model-root", default="/tmp/vllm_runner_bench")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    args.models = args.models.split(",")
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": git_commit(),
        "card": torch.cuda.get_device_name(),
        "command": " ".join(["python", *sys.argv]),
        "copy_bandwidth_GBps": copy_bandwidth("cuda", 1 << 30) / 1e9,
    }
    print(f"{report['card']}: copy {report['copy_bandwidth_GBps']:,.0f} GB/s", flush=True)
    cases = args.cases.split(",")
    for case, fn in [("tiles", bench_tiles), ("fusions", bench_fusions),
                     ("chain", bench_chain), ("engine", bench_engine)]:  # fmt: skip
        if case in cases:
            print(f"[{case}]", flush=True)
            fn(args, report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
