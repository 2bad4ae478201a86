"""Probe: batch-1 decoder layers' GEMVs as one persistent kernel with grid barriers, against
the same GEMV code launched once per projection, and the engine's GEMV chain.

    python benchmarks/persistent_layers_probe.py [--model 1b] [--out x.json]

The seventh session measured ~1.5-2 us per kernel boundary at batch 1 even under PDL (the
next kernel's programs cannot become resident while the previous one holds the SMs). Here
one program per SM runs every layer's four projections (qkv with its RMSNorm, o + residual,
gate_up with RMSNorm and SiLU-and-mul, down + residual; the attention left out, as the
chain's "no attention" variant) and crosses a grid barrier (one counter, one acquire-release
atomic per program) between them, optionally after requesting its first weight tiles of the
next projection (``early``). Weights are distinct per layer (16 x 121.6 MB for 1B), so
nothing stays in L2. Not used by the engine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = {"1b": (2048, 3072, 8192, 16), "8b": (4096, 6144, 14336, 32)}  # hidden, qkv, inter, L


@triton.jit
def _grid_sync(counter_ptr, NUM_PROGS: tl.constexpr, POLL: tl.constexpr):
    """Every program arrives (one acq_rel add after a CTA barrier), then spins until all of
    this round's arrivals are counted; the counter only grows, so no reset is needed.
    POLL: spin on volatile loads (no atomics queued behind the arrivals), then one acquire."""
    tl.debug_barrier()
    old = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    target = (old // NUM_PROGS + 1) * NUM_PROGS
    if POLL:
        while tl.load(counter_ptr, volatile=True) < target:
            pass
        tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    else:
        while tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu") < target:
            pass
    tl.debug_barrier()


@triton.jit
def _barriers_kernel(counter_ptr, N, P: tl.constexpr, POLL: tl.constexpr):
    for _ in range(N):
        _grid_sync(counter_ptr, P, POLL)


@triton.jit
def _tile_ptrs(w_ptr, t, pid, offs_n, offs_k, P: tl.constexpr, K: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    KT: tl.constexpr = K // BLOCK_K
    rb = pid + (t // KT) * P
    rows = rb * BLOCK_N + offs_n
    return w_ptr + rows[:, None].to(tl.int64) * K + (t % KT) * BLOCK_K + offs_k[None, :]


@triton.jit
def _phase(x_ptr, w_ptr, g_ptr, res_ptr, out_ptr, counter_ptr, pid, eps,
           N: tl.constexpr, K: tl.constexpr, P: tl.constexpr, BLOCK_N: tl.constexpr,
           BLOCK_K: tl.constexpr, NORM: tl.constexpr, GATED: tl.constexpr,
           RESIDUAL: tl.constexpr, SYNC: tl.constexpr, EARLY: tl.constexpr,
           POLL: tl.constexpr):  # fmt: skip
    """out[n] = (res[n] +) act(norm(x) @ W[n]) for this program's row blocks pid, pid + P, ...
    walked as one stream of (row block, K tile) with two tiles in flight."""
    KT: tl.constexpr = K // BLOCK_K
    NB: tl.constexpr = N // BLOCK_N
    total = (NB - pid + P - 1) // P * KT
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    up = N * K
    if SYNC and not EARLY:
        _grid_sync(counter_ptr, P, POLL)
    p0 = _tile_ptrs(w_ptr, 0, pid, offs_n, offs_k, P, K, BLOCK_N, BLOCK_K)
    p1 = _tile_ptrs(w_ptr, tl.minimum(1, total - 1), pid, offs_n, offs_k, P, K, BLOCK_N, BLOCK_K)
    w0 = tl.load(p0)
    w1 = tl.load(p1)
    u0 = w0
    u1 = w1
    if GATED:
        u0 = tl.load(p0 + up)
        u1 = tl.load(p1 + up)
    if SYNC and EARLY:
        _grid_sync(counter_ptr, P, POLL)
    inv = 1.0
    if NORM:
        xs = tl.load(x_ptr + tl.arange(0, K)).to(tl.float32)
        inv = tl.rsqrt(tl.sum(xs * xs, axis=0) / K + eps)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for t in range(total):
        pn = _tile_ptrs(w_ptr, tl.minimum(t + 2, total - 1), pid, offs_n, offs_k, P, K,
                        BLOCK_N, BLOCK_K)  # fmt: skip
        wn = tl.load(pn)
        un = wn
        if GATED:
            un = tl.load(pn + up)
        kt = t % KT
        x = tl.load(x_ptr + kt * BLOCK_K + offs_k).to(tl.float32)
        if NORM:
            x = x * tl.load(g_ptr + kt * BLOCK_K + offs_k).to(tl.float32) * inv
        acc += w0.to(tl.float32) * x[None, :]
        if GATED:
            acc_u += u0.to(tl.float32) * x[None, :]
        if kt == KT - 1:
            rows = (pid + (t // KT) * P) * BLOCK_N + offs_n
            s = tl.sum(acc, axis=1)
            if GATED:
                su = tl.sum(acc_u, axis=1)
                g = s.to(out_ptr.dtype.element_ty).to(tl.float32)
                s = g / (1.0 + tl.exp(-g)) * su.to(out_ptr.dtype.element_ty).to(tl.float32)
            if RESIDUAL:
                s = s.to(out_ptr.dtype.element_ty).to(tl.float32)
                s += tl.load(res_ptr + rows).to(tl.float32)
            tl.store(out_ptr + rows, s.to(out_ptr.dtype.element_ty))
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            acc_u = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        w0, u0, w1, u1 = w1, u1, wn, un


@triton.jit
def _layers_kernel(xa, xb, qkv, act, w_qkv, w_o, w_gu, w_down, g_ptr, counter_ptr, eps,
                   NUM_LAYERS, H: tl.constexpr, QKV: tl.constexpr, INTER: tl.constexpr,
                   P: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BK_DOWN: tl.constexpr,
                   SYNC: tl.constexpr, EARLY: tl.constexpr, ONLY: tl.constexpr,
                   POLL: tl.constexpr):  # fmt: skip
    """NUM_LAYERS layers from the weights given; ONLY >= 0: just that phase (0-3), no barrier."""
    pid = tl.program_id(0)
    lq, lo, lg, ld = w_qkv, w_o, w_gu, w_down
    for _ in range(NUM_LAYERS):
        if ONLY < 0 or ONLY == 0:
            _phase(xa, lq, g_ptr, xa, qkv, counter_ptr, pid, eps, QKV, H, P, BN, BK,
                   True, False, False, SYNC, EARLY, POLL)  # fmt: skip
        if ONLY < 0 or ONLY == 1:  # o reads the q third of qkv (the attention left out)
            _phase(qkv, lo, g_ptr, xa, xb, counter_ptr, pid, eps, H, H, P, BN, BK,
                   False, False, True, SYNC, EARLY, POLL)  # fmt: skip
        if ONLY < 0 or ONLY == 2:
            _phase(xb, lg, g_ptr, xb, act, counter_ptr, pid, eps, INTER, H, P, BN, BK,
                   True, True, False, SYNC, EARLY, POLL)  # fmt: skip
        if ONLY < 0 or ONLY == 3:
            _phase(act, ld, g_ptr, xb, xa, counter_ptr, pid, eps, H, INTER, P, BN, BK_DOWN,
                   False, False, True, SYNC, EARLY, POLL)  # fmt: skip
        lq += QKV * H
        lo += H * H
        lg += 2 * INTER * H
        ld += H * INTER


def run(mode: str, bufs: dict, shapes, p: int, bn: int, bk: int, bk_down: int, warps: int):
    h, qkv, inter, layers = shapes
    acts = (bufs["xa"], bufs["xb"], bufs["qkv"], bufs["act"])
    tail = (bufs["g"], bufs["counter"], 1e-5)
    weights = [bufs[k] for k in ("w_qkv", "w_o", "w_gu", "w_down")]
    consts = dict(H=h, QKV=qkv, INTER=inter, P=p, BN=bn, BK=bk, BK_DOWN=bk_down, num_warps=warps,
                  num_stages=1)  # fmt: skip
    for n in (qkv, h, inter):
        assert n // bn >= p and n % bn == 0, f"every program needs a row block: {n} / {bn} < {p}"
    if mode == "launches":
        for layer in range(layers):
            for phase in range(4):
                _layers_kernel[(p,)](*acts, *(w[layer] for w in weights), *tail, 1,
                                     SYNC=False, EARLY=False, ONLY=phase, POLL=False,
                                     **consts)  # fmt: skip
    else:
        _layers_kernel[(p,)](*acts, *weights, *tail, layers, SYNC=True, EARLY=mode != "sync",
                             ONLY=-1, POLL=mode == "poll", **consts)  # fmt: skip


def reference(bufs: dict, shapes) -> torch.Tensor:
    h, qkv, inter, layers = shapes
    x = bufs["x0"].float()
    g = bufs["g"].float()
    for i in range(layers):
        xn = x * torch.rsqrt(x.pow(2).mean() + 1e-5) * g
        q = (bufs["w_qkv"][i].float() @ xn).bfloat16().float()[:h]
        o = (bufs["w_o"][i].float() @ q).bfloat16().float()
        x = (x.bfloat16().float() + o).bfloat16().float()
        xn = x * torch.rsqrt(x.pow(2).mean() + 1e-5) * g
        gu = (bufs["w_gu"][i].float() @ xn).bfloat16().float()
        a = (torch.nn.functional.silu(gu[:inter]) * gu[inter:]).bfloat16().float()
        x = (x + (bufs["w_down"][i].float() @ a).bfloat16().float()).bfloat16().float()
    return x


def _graph_us(fn) -> float:
    """Median microseconds of one replay of ``fn`` captured in a CUDA graph."""
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        fn()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, stream=side):
            fn()
    times = []
    for _ in range(7):
        start, end = torch.cuda.Event(True), torch.cuda.Event(True)
        start.record()
        for _ in range(20):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / 20)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="1b")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    shapes = MODELS[args.model]
    h, qkv, inter, layers = shapes
    dev = "cuda"
    torch.manual_seed(0)
    bufs = {
        "w_qkv": (torch.randn(layers, qkv, h, device=dev) * h**-0.5).bfloat16(),
        "w_o": (torch.randn(layers, h, h, device=dev) * h**-0.5).bfloat16(),
        "w_gu": (torch.randn(layers, 2 * inter, h, device=dev) * h**-0.5).bfloat16(),
        "w_down": (torch.randn(layers, h, inter, device=dev) * inter**-0.5).bfloat16(),
        "g": (torch.rand(h, device=dev) + 0.5).bfloat16(),
        "x0": torch.randn(h, device=dev).bfloat16(),
        "xb": torch.empty(h, device=dev, dtype=torch.bfloat16),
        "qkv": torch.empty(qkv, device=dev, dtype=torch.bfloat16),
        "act": torch.empty(inter, device=dev, dtype=torch.bfloat16),
        "counter": torch.zeros(1, device=dev, dtype=torch.int32),
    }
    bufs["xa"] = bufs["x0"].clone()
    weight_bytes = sum(bufs[k].numel() * 2 for k in ("w_qkv", "w_o", "w_gu", "w_down"))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    ref = reference(bufs, shapes)
    rows: list[dict] = []
    for p in (sms, 2 * sms):
        for poll in (False, True):
            us = _graph_us(lambda p=p, poll=poll: _barriers_kernel[(p,)](
                bufs["counter"], 64, P=p, POLL=poll, num_warps=4))  # fmt: skip
            print(f"barriers only P={p} poll={poll}: {us / 64:.2f} us per barrier", flush=True)
            rows.append({"mode": "barriers", "P": p, "poll": poll, "us_barrier": us / 64})
    configs = [(sms, 8, 1024, 1024, 8), (2 * sms, 4, 1024, 1024, 4), (2 * sms, 4, 512, 1024, 4),
               (3 * sms, 2, 1024, 1024, 4)]  # fmt: skip
    for p, bn, bk, bkd, warps in configs:
        for mode in ("launches", "sync", "early", "poll"):
            name = f"{mode} P={p} BN={bn} BK={bk}/{bkd} w{warps}"
            try:
                bufs["xa"].copy_(bufs["x0"])
                run(mode, bufs, shapes, p, bn, bk, bkd, warps)
                torch.cuda.synchronize()
                err = (bufs["xa"].float() - ref).abs().max().item()
                cfg = (mode, bufs, shapes, p, bn, bk, bkd, warps)
                us = _graph_us(lambda cfg=cfg: run(*cfg))
            except Exception as e:  # one bad config must not end the sweep
                print(f"{name}: failed {e!r}"[:400], flush=True)
                continue
            row = {"mode": mode, "P": p, "BN": bn, "BK": bk, "BK_down": bkd, "warps": warps,
                   "us_layer": us / layers, "TBps": weight_bytes / us / 1e6,
                   "max_err": err}  # fmt: skip
            rows.append(row)
            print(f"{name:<36}: {us / layers:6.2f} us/layer, {weight_bytes / us / 1e6:5.2f} "
                  f"TB/s, max err vs fp32 chain {err:.3g}", flush=True)  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps({"model": args.model, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
