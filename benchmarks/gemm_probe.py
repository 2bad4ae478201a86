"""Can a Triton GEMM beat cuBLAS on W1 8B's 256-row decode projections? (CUDA only)

W1's decode steps spend ~6.6 ms of ~13 ms in cuBLAS GEMMs at M = 256 (x [256, K] @ W[N, K]^T):
qkv 6144 x 4096, o 4096 x 4096, gate_up 28672 x 4096, down 4096 x 14336. This times, in one
process and CUDA graphs, cuBLAS against Triton kernels: a plain tile grid (pointer loads or
tensor-memory-accelerator descriptors), a persistent grid, stream-K (whole waves of tiles, then
the remaining tiles' K iterations spread over all SMs), and for gate_up a variant whose
epilogue applies SiLU-and-mul (gate / up rows interleaved, so each tile holds both halves).
Weights cycle through enough copies that none stays in L2 (as across a model's layers).

    python benchmarks/gemm_probe.py [--out results.json] [--shapes gate_up,qkv] [--kinds streamk]
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
import triton.testing

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


@triton.jit
def _silu_mul(acc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    gate, up = tl.split(tl.reshape(acc, [BLOCK_M, BLOCK_N // 2, 2]))  # columns alternate
    return (gate / (1.0 + tl.exp(-gate)) * up).to(tl.bfloat16)


@triton.jit
def _mm_ptr(x_ptr, w_ptr, c_ptr, M, N, K, stride_c,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            SILU: tl.constexpr):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    xp = x_ptr + rm[:, None].to(tl.int64) * K + rk[None, :]
    wp = w_ptr + rn[:, None].to(tl.int64) * K + rk[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for _ in range(0, K, BLOCK_K):
        acc = tl.dot(tl.load(xp), tl.load(wp).T, acc)
        xp += BLOCK_K
        wp += BLOCK_K
    if SILU:
        cn = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        c = c_ptr + rm[:, None].to(tl.int64) * stride_c + cn[None, :]
        tl.store(c, _silu_mul(acc, BLOCK_M, BLOCK_N))
    else:
        tl.store(c_ptr + rm[:, None].to(tl.int64) * stride_c + rn[None, :], acc.to(tl.bfloat16))


@triton.jit
def _mm_tma(x_desc, w_desc, c_desc, M, N, K,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            SILU: tl.constexpr):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        acc = tl.dot(x_desc.load([pid_m * BLOCK_M, k]), w_desc.load([pid_n * BLOCK_N, k]).T, acc)
    if SILU:
        c_desc.store([pid_m * BLOCK_M, pid_n * (BLOCK_N // 2)], _silu_mul(acc, BLOCK_M, BLOCK_N))
    else:
        c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(tl.bfloat16))


@triton.jit
def _mm_tma_persistent(x_desc, w_desc, c_desc, M, N, K,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       SILU: tl.constexpr, NUM_PROGRAMS: tl.constexpr):  # fmt: skip
    num_m = tl.cdiv(M, BLOCK_M)
    num_tiles = num_m * tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    tile = tl.program_id(0) - NUM_PROGRAMS
    pid_m = 0
    pid_n = 0
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # one flat loop over (tile, k) so the pipeline runs across tile boundaries
    for i in tl.range(0, tl.cdiv(num_tiles - tl.program_id(0), NUM_PROGRAMS) * k_tiles):
        ki = i % k_tiles
        if ki == 0:
            tile += NUM_PROGRAMS
            pid_m = tile % num_m
            pid_n = tile // num_m
        acc = tl.dot(x_desc.load([pid_m * BLOCK_M, ki * BLOCK_K]),
                     w_desc.load([pid_n * BLOCK_N, ki * BLOCK_K]).T, acc)  # fmt: skip
        if ki == k_tiles - 1:
            if SILU:
                out = _silu_mul(acc, BLOCK_M, BLOCK_N)
                c_desc.store([pid_m * BLOCK_M, pid_n * (BLOCK_N // 2)], out)
            else:
                c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(tl.bfloat16))
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)


@triton.jit
def _k_loop(x_desc, w_desc, pid_m, pid_n, k0, k1, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_K: tl.constexpr):  # fmt: skip
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for ki in range(k0, k1):
        acc = tl.dot(x_desc.load([pid_m * BLOCK_M, ki * BLOCK_K]),
                     w_desc.load([pid_n * BLOCK_N, ki * BLOCK_K]).T, acc)  # fmt: skip
    return acc


@triton.jit
def _store_tile(c_desc, acc, pid_m, pid_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                SILU: tl.constexpr):  # fmt: skip
    if SILU:
        c_desc.store([pid_m * BLOCK_M, pid_n * (BLOCK_N // 2)], _silu_mul(acc, BLOCK_M, BLOCK_N))
    else:
        c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(tl.bfloat16))


@triton.jit
def _mm_streamk(x_desc, w_desc, c_desc, ws_ptr, flags_ptr, M, N, K,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                SILU: tl.constexpr, NUM_PROGRAMS: tl.constexpr):  # fmt: skip
    """Stream-K: whole waves of tiles data-parallel, the remaining tiles' K iterations split
    evenly over all programs. A tile split over programs is finished by its last contributor
    (the highest program, which reaches it first: it parks its partial and sums the others'
    at the end of its range). Partials: ws [programs, 2 slots, BLOCK_M, BLOCK_N] fp32;
    flags [programs, 2] int32, zero between launches (the owner resets what it consumed)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_tiles = num_m * tl.cdiv(N, BLOCK_N)
    iters = tl.cdiv(K, BLOCK_K)
    dp_tiles = num_tiles // NUM_PROGRAMS * NUM_PROGRAMS
    for tile in range(pid, dp_tiles, NUM_PROGRAMS):
        acc = _k_loop(x_desc, w_desc, tile % num_m, tile // num_m, 0, iters,
                      BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
        _store_tile(c_desc, acc, tile % num_m, tile // num_m, BLOCK_M, BLOCK_N, SILU)
    total = (num_tiles - dp_tiles) * iters
    start = pid * total // NUM_PROGRAMS
    end = (pid + 1) * total // NUM_PROGRAMS
    offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    owned = start * 0 - 1  # the tile whose tail this program holds (first segment), if any
    it = start
    while it < end:
        local = it // iters
        k0 = it - local * iters
        k1 = tl.minimum(iters, k0 + end - it)
        tile = dp_tiles + local
        acc = _k_loop(x_desc, w_desc, tile % num_m, tile // num_m, k0, k1,
                      BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
        if (k0 == 0) & (k1 == iters):
            _store_tile(c_desc, acc, tile % num_m, tile // num_m, BLOCK_M, BLOCK_N, SILU)
        else:
            slot = (it != start).to(tl.int32)  # 0: the range's first segment, 1: its last
            tl.store(ws_ptr + ((pid * 2 + slot) * BLOCK_M * BLOCK_N).to(tl.int64) + offs, acc)
            if k1 == iters:
                owned = local  # the tail: summed with the others at the end
            else:
                tl.debug_barrier()  # every thread's partial before the flag
                tl.atomic_xchg(flags_ptr + pid * 2 + slot, 1, sem="release", scope="gpu")
        it += k1 - k0
    if owned >= 0:
        tl.debug_barrier()  # the parked partial, written by other threads of this program
        acc = tl.load(ws_ptr + (pid * 2 * BLOCK_M * BLOCK_N).to(tl.int64) + offs)
        tile_start = owned * iters
        q = pid - 1
        q_end = start
        while q_end > tile_start:  # lower programs whose range reaches into the tile
            q_start = q * total // NUM_PROGRAMS
            q_slot = (q_start < tile_start).to(tl.int32)
            flag = flags_ptr + q * 2 + q_slot
            while tl.atomic_add(flag, 0, sem="acquire", scope="gpu") == 0:
                pass
            tl.debug_barrier()
            acc += tl.load(ws_ptr + ((q * 2 + q_slot) * BLOCK_M * BLOCK_N).to(tl.int64) + offs,
                           cache_modifier=".cg")  # fmt: skip
            tl.store(flag, 0)
            q_end = q_start
            q -= 1
        tile = dp_tiles + owned
        _store_tile(c_desc, acc, tile % num_m, tile // num_m, BLOCK_M, BLOCK_N, SILU)


_STREAMK: dict = {}


def _streamk_buffers(device, progs: int, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stream-K's partials (2 slots a program) and flags (zeroed once; each launch leaves
    them at zero), made before any CUDA-graph capture and kept."""
    key = (device, progs, tile)
    if key not in _STREAMK:
        _STREAMK[key] = (torch.empty(progs * 2 * tile, dtype=torch.float32, device=device),
                         torch.zeros(progs * 2, dtype=torch.int32, device=device))  # fmt: skip
    return _STREAMK[key]


def _run(kind, x, w, c, cfg, silu, sms):
    bm, bn, bk, warps, stages = cfg
    M, K = x.shape
    N = w.shape[0]
    grid = (triton.cdiv(N, bn), triton.cdiv(M, bm))
    kw = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SILU=silu, num_warps=warps, num_stages=stages)
    if kind == "ptr":
        _mm_ptr[grid](x, w, c, M, N, K, c.stride(0), **kw)
        return
    from triton.tools.tensor_descriptor import TensorDescriptor

    xd = TensorDescriptor.from_tensor(x, [bm, bk])
    wd = TensorDescriptor.from_tensor(w, [bn, bk])
    cd = TensorDescriptor.from_tensor(c, [bm, bn // 2 if silu else bn])
    if kind == "tma":
        _mm_tma[grid](xd, wd, cd, M, N, K, **kw)
    elif kind == "streamk":
        ws, flags = _streamk_buffers(x.device, sms, bm * bn)
        _mm_streamk[(sms,)](xd, wd, cd, ws, flags, M, N, K, NUM_PROGRAMS=sms, **kw)
    else:
        progs = min(sms, grid[0] * grid[1])
        _mm_tma_persistent[(progs,)](xd, wd, cd, M, N, K, NUM_PROGRAMS=progs, **kw)


CONFIGS = [  # BLOCK_M, BLOCK_N, BLOCK_K, warps, stages
    (256, 128, 64, 8, 3), (256, 128, 64, 8, 4), (128, 256, 64, 8, 3), (128, 256, 64, 8, 4),
    (128, 128, 64, 4, 4), (128, 128, 64, 8, 4), (128, 128, 128, 8, 3), (256, 64, 64, 8, 4),
    (128, 64, 64, 4, 5), (64, 128, 64, 4, 5), (64, 256, 64, 4, 4),
]  # fmt: skip


def cold_operands(m: int, N: int, K: int):
    """x [m, K], weight copies [N, K] (> 400 MB in all, so none stays in L2, as across a
    model's layers), x @ copy 0 in fp32, and ``bench(fn)``: microseconds per ``fn(w)``,
    ``w`` cycling over the copies in a CUDA graph."""
    dev = torch.device("cuda")
    copies = max(2, -(-400_000_000 // (N * K * 2)))
    ws = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) / K**0.5 for _ in range(copies)]
    x = torch.randn(m, K, device=dev, dtype=torch.bfloat16)

    def bench(fn) -> float:
        ms = triton.testing.do_bench_cudagraph(lambda: [fn(w) for w in ws], rep=100)
        return ms * 1e3 / copies

    return x, ws, x.float() @ ws[0].float().T, bench


def probe_shape(name: str, m: int, sms: int, kinds: list[str]) -> list[dict]:
    dev = torch.device("cuda")
    N, K = SHAPES[name]
    x, ws, ref, bench = cold_operands(m, N, K)
    flops = 2 * m * N * K
    c = torch.empty(m, N, device=dev, dtype=torch.bfloat16)
    us = bench(lambda w: torch.mm(x, w.T, out=c))
    rows = [{"shape": name, "kind": "cublas", "us": us, "tflops": flops / us / 1e6}]
    print(f"{name:8s} cublas {us:8.1f} us {flops / us / 1e6:6.0f} TFLOP/s", flush=True)
    for kind in kinds:
        for cfg in CONFIGS:
            for silu in [False, True] if name == "gate_up" else [False]:
                cs = torch.empty(m, N // 2 if silu else N, device=dev, dtype=torch.bfloat16)
                want = torch.nn.functional.silu(ref[:, 0::2]) * ref[:, 1::2] if silu else ref
                try:
                    _run(kind, x, ws[0], cs, cfg, silu, sms)
                    err = ((cs.float() - want).abs().max() / want.abs().max()).item()
                    us = bench(lambda w, cs=cs, kind=kind, cfg=cfg, silu=silu:
                               _run(kind, x, w, cs, cfg, silu, sms))  # fmt: skip
                except Exception as e:  # noqa: BLE001 - a probe: report and go on
                    print(f"{name:8s} {kind} {cfg} silu={silu}: {type(e).__name__}: "
                          f"{str(e)[:160]}", flush=True)  # fmt: skip
                    continue
                rows.append({"shape": name, "kind": kind, "cfg": cfg, "silu": silu,
                             "us": us, "tflops": flops / us / 1e6, "rel_err": err})  # fmt: skip
                print(f"{name:8s} {kind:10s} {cfg} silu={silu:d} {us:8.1f} us "
                      f"{flops / us / 1e6:6.0f} TFLOP/s err {err:.1e}", flush=True)  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--m", type=int, default=256)
    p.add_argument("--kinds", default="ptr,tma,persistent,streamk")
    args = p.parse_args()
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    triton.set_allocator(lambda size, _align, _stream: torch.empty(size, dtype=torch.int8,
                                                                  device=dev))  # fmt: skip
    torch.manual_seed(0)
    kinds = args.kinds.split(",")
    rows = [r for name in args.shapes.split(",") for r in probe_shape(name, args.m, sms, kinds)]
    if args.out:
        args.out.write_text(json.dumps({"card": torch.cuda.get_device_name(), "m": args.m,
                                        "rows": rows}, indent=1))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
