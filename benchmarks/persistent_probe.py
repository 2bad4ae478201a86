"""Is a grid barrier inside one persistent kernel cheaper than kernel boundaries (PDL)?

Batch-1 Llama-3.2-1B MLP-shaped chain of three GEMVs, bf16: o (2048 x 2048) -> gate_up
(16384 x 2048) -> down (2048 x 8192, reading the first 8192 outputs), 109 MB of weights.
Both variants run the same simple GEMV body (BN rows x BK columns per tile, the next K tile
requested before the current one is used, the first tile before waiting): three kernels
chained with programmatic dependent launch, or one persistent kernel of ``x`` programs per
SM whose phases meet at a grid barrier (a release add and acquire spin on a counter; each
program requests its first tile of the next phase before it waits). Four weight sets cycle
in one CUDA graph, so nothing stays in L2. CUDA only:

    BN=4 BK=1024 python benchmarks/persistent_probe.py

A persistent kernel deadlocks if its programs are not all resident at once: programs per SM
are capped by registers (allocated per warp in units of 256) and shared memory, and a spin
limit turns a deadlock into a wrong result (``matches_separate: false``) instead of a hang.
"""

import json
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from kernels.pdl import wait_for_predecessor  # noqa: E402

BN, BK = int(os.environ.get("BN", 4)), int(os.environ.get("BK", 1024))


@triton.jit
def _first(w_ptr, t, T, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = t * BLOCK_N + tl.arange(0, BLOCK_N)
    offs = tl.arange(0, BLOCK_K)
    m = (t < T) & (rows[:, None] >= 0)
    return tl.load(w_ptr + rows[:, None].to(tl.int64) * K + offs[None, :], mask=m, other=0.0)


@triton.jit
def _rows(w, w_ptr, x_ptr, t, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = t * BLOCK_N + tl.arange(0, BLOCK_N)
    offs = tl.arange(0, BLOCK_K)
    base = w_ptr + rows[:, None].to(tl.int64) * K + offs[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        nxt = tl.load(base + k0 + BLOCK_K, mask=(k0 + BLOCK_K + offs[None, :]) < K, other=0.0)
        x = tl.load(x_ptr + k0 + offs, cache_modifier=".cg")
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        w = nxt
    return tl.sum(acc, 1), rows


@triton.jit
def _gemv_step(w_ptr, x_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               PDL: tl.constexpr):  # fmt: skip
    t = tl.program_id(0)
    w = _first(w_ptr, t, N // BLOCK_N, K, BLOCK_N, BLOCK_K)
    wait_for_predecessor(PDL)
    y, rows = _rows(w, w_ptr, x_ptr, t, K, BLOCK_N, BLOCK_K)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty))


@triton.jit
def _grid_sync(counter_ptr, target, err_ptr):
    tl.debug_barrier()
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
    seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    spins = 0
    while (seen < target) & (spins < 2000000):
        seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
        spins += 1
    if spins >= 2000000:
        tl.atomic_add(err_ptr, 1)
    tl.debug_barrier()


@triton.jit
def _phase(w, w_ptr, x_ptr, y_ptr, K, T, P, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0)
    while t < T:
        y, rows = _rows(w, w_ptr, x_ptr, t, K, BLOCK_N, BLOCK_K)
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty))
        t += P
        w = _first(w_ptr, t, T, K, BLOCK_N, BLOCK_K)


@triton.jit
def _persistent3(w1, w2, w3, x0, y1, y2, y3, counter_ptr, err_ptr, N1, K1, N2, K2, N3, K3,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    w = _first(w1, pid, N1 // BLOCK_N, K1, BLOCK_N, BLOCK_K)
    _phase(w, w1, x0, y1, K1, N1 // BLOCK_N, P, BLOCK_N, BLOCK_K)
    w = _first(w2, pid, N2 // BLOCK_N, K2, BLOCK_N, BLOCK_K)  # requested before the barrier
    _grid_sync(counter_ptr, P, err_ptr)
    _phase(w, w2, y1, y2, K2, N2 // BLOCK_N, P, BLOCK_N, BLOCK_K)
    w = _first(w3, pid, N3 // BLOCK_N, K3, BLOCK_N, BLOCK_K)
    _grid_sync(counter_ptr, 2 * P, err_ptr)
    _phase(w, w3, y2, y3, K3, N3 // BLOCK_N, P, BLOCK_N, BLOCK_K)
    tl.debug_barrier()
    old = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    if old == 3 * P - 1:  # the last program out resets the counter for the next launch
        tl.atomic_xchg(counter_ptr, 0)


def main() -> None:
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    shapes = [(2048, 2048), (16384, 2048), (2048, 8192)]
    sets = [[torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for n, k in shapes]
            for _ in range(4)]  # fmt: skip
    x0 = torch.randn(2048, device=dev, dtype=torch.bfloat16)
    ys = [torch.empty(n, device=dev, dtype=torch.bfloat16) for n, _ in shapes]
    counter = torch.zeros(1, device=dev, dtype=torch.int32)
    err = torch.zeros(1, device=dev, dtype=torch.int32)

    def chain(ws, pdl=True):
        x = x0
        for w, y in zip(ws, ys, strict=True):
            n, k = w.shape
            kw = {"launch_pdl": True} if pdl else {}
            _gemv_step[(n // BN,)](w, x, y, n, k, BLOCK_N=BN, BLOCK_K=BK, PDL=pdl,
                                   num_warps=4, **kw)  # fmt: skip
            x = y

    out = {}
    for per_sm in (1, 2, 4, 5, 6, 8):
        P = sms * per_sm

        def persist(ws, P=P):
            _persistent3[(P,)](*ws, x0, *ys, counter, err, 2048, 2048, 16384, 2048, 2048, 8192,
                               BLOCK_N=BN, BLOCK_K=BK, num_warps=4)  # fmt: skip

        k = _persistent3.warmup(*sets[0], x0, *ys, counter, err, 2048, 2048, 16384, 2048, 2048,
                                8192, BLOCK_N=BN, BLOCK_K=BK, num_warps=4, grid=(P,))  # fmt: skip
        getattr(k, "_init_handles", lambda: None)()
        regs_per_warp = -(-max(k.n_regs, 1) * 32 // 256) * 256
        fit = min(65536 // (4 * regs_per_warp), 228 * 1024 // (k.metadata.shared + 1024), 32)
        if per_sm > fit:
            out[f"persistent x{per_sm}"] = f"skipped: {fit} programs fit per SM ({k.n_regs} regs)"
            continue
        err.zero_()
        persist(sets[0])
        torch.cuda.synchronize()
        got = ys[2].float().clone()
        chain(sets[0])
        torch.cuda.synchronize()
        want = ys[2].float().clone()
        ref = x0.float()
        for w in sets[0]:
            ref = (w.float() @ ref[: w.shape[1]]).bfloat16().float()
        ok = torch.allclose(got, want, atol=2e-2, rtol=2e-2) and int(err) == 0
        ms = triton.testing.do_bench_cudagraph(lambda: [persist(s) for s in sets], rep=50,
                                               return_mode="median")  # fmt: skip
        out[f"persistent x{per_sm}"] = {
            "us_per_chain": ms * 1e3 / len(sets), "regs": k.n_regs, "counter": int(counter),
            "matches_separate": ok, "max_diff_vs_ref": float((got - ref).abs().max()),
        }  # fmt: skip
        print(out[f"persistent x{per_sm}"], flush=True)
    for pdl in (True, False):
        ms = triton.testing.do_bench_cudagraph(lambda pdl=pdl: [chain(s, pdl) for s in sets],
                                               rep=50, return_mode="median")  # fmt: skip
        out[f"separate pdl={pdl}"] = {"us_per_chain": ms * 1e3 / len(sets)}
    mb = sum(n * k * 2 for n, k in shapes) / 1e6
    out["weight_MB_per_chain"] = mb
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
