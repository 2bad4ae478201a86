"""Triton kernel microbenchmarks against the card's measured copy bandwidth and matmul rate.

CUDA only. Llama-3-8B attention shapes (32 q heads, 8 kv heads, head_dim 128, bf16, block_size
16, shuffled block tables):
    python benchmarks/kernels.py [--quick] [--check] [--sweep] [--w1] [--gaps] [--out x.json|.md]

Conventions:
- copy GB/s = (bytes read + bytes written) / time of a 1 GiB device-to-device copy; matmul
  TFLOP/s = 2*M*N*K / time of a bf16 matmul (8192^3; 4096^3 with --quick);
- every time is the median of triton.testing.do_bench (L2 flushed before each run);
  decode is also timed in a CUDA graph (as the engine runs it, no launch gaps) over
  block tables rotated across disjoint cache regions larger than L2;
- decode GB/s counts K/V bytes read (seq_len * kv_heads * head_dim * 2 tensors) plus q/out;
  prefill TFLOP/s counts causal FLOPs: 4 * heads * head_dim * sum(L * (L + 1) / 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from kernel_bench import (  # noqa: E402 - benchmarks/, the script's folder, is on sys.path
    BLOCK_SIZE,
    BYTES,
    DEVICE,
    DTYPE,
    HEAD_DIM,
    HEADS,
    HIDDEN,
    KV_HEADS,
    KVPool,
    Row,
    bench,
    l2_bytes,
    measure_peaks,
)
from kernels_w1 import bench_w1  # noqa: E402


def bench_decode(pool: KVPool, batch: int, ctx: int, copy_gbs: float, rep: int, **kw: int) -> Row:
    from kernels.paged_attention import paged_attention_decode

    kv_bytes = 2 * batch * ctx * KV_HEADS * HEAD_DIM * BYTES
    q = torch.randn(batch, HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=DEVICE)
    copies = min(64, -(-4 * l2_bytes() // kv_bytes))  # rotated working set >= 4x L2
    tables = itertools.cycle(pool.block_tables(batch, ctx, copies))
    scale = HEAD_DIM**-0.5

    def run() -> torch.Tensor:
        return paged_attention_decode(
            q, pool.k, pool.v, next(tables), seq_lens, scale, max_seq_len=ctx, **kw
        )

    import triton.testing

    ms = bench(run, rep)
    graph_ms = triton.testing.do_bench_cudagraph(run, rep=max(rep // 4, 5), return_mode="median")
    moved = kv_bytes + 2 * q.numel() * BYTES
    gbs = moved / graph_ms / 1e6
    name = "decode_attention"
    if kw:  # --sweep: block_n, num_warps, num_stages
        name = f"decode[n={kw['block_n']} w={kw['num_warps']} s={kw['num_stages']}]"
    return Row(name, f"b={batch} ctx={ctx}",
               ms * 1e3, gbs, "GB/s", 100 * gbs / copy_gbs, graph_us=graph_ms * 1e3)  # fmt: skip


def bench_prefill(pool: KVPool, num_seqs: int, seq_len: int, tflops: float, rep: int) -> Row:
    from kernels.prefill_attention import prefill_attention

    tables = pool.block_tables(num_seqs, seq_len, 1)[0]
    q = torch.randn(num_seqs * seq_len, HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    seq_lens = torch.full((num_seqs,), seq_len, dtype=torch.int32, device=DEVICE)
    qsl = torch.arange(0, num_seqs + 1, dtype=torch.int32, device=DEVICE) * seq_len
    ms = bench(lambda: prefill_attention(q, pool.k, pool.v, tables, seq_lens, qsl, 0.088), rep)
    flops = 4 * HEADS * HEAD_DIM * num_seqs * seq_len * (seq_len + 1) / 2
    rate = flops / ms / 1e9
    return Row("prefill_attention", f"n={num_seqs} len={seq_len}", ms * 1e3, rate, "TFLOP/s",
               100 * rate / tflops)  # fmt: skip


@triton.jit
def _chain_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """y = x + 1: one link of --gaps' chain; with PDL it waits on its predecessor in-kernel."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if PDL:
        tl.extra.cuda.gdc_wait()  # the predecessor's writes are visible after this
    x = tl.load(x_ptr + offs, mask=offs < n)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    tl.store(y_ptr + offs, x + 1.0, mask=offs < n)


def bench_launch_gaps(rep: int) -> list[Row]:
    """Time per kernel of a chain of 64 dependent tiny kernels replayed in a CUDA graph
    (--gaps), plain and with programmatic dependent launch (PDL: each kernel is launched
    while its predecessor drains and waits on it in-kernel). At batch 1 a decode step is
    ~350 such launches, so the gap per kernel bounds what fusing or PDL can save."""
    import triton.testing

    rows = []
    for n, programs in [(4096, 4), (4096 * 64, 256)]:
        bufs = [torch.zeros(n, device=DEVICE) for _ in range(2)]
        for pdl in (False, True):
            kw = {"launch_pdl": True} if pdl else {}

            def chain(pdl=pdl, kw=kw, bufs=bufs, n=n, programs=programs):
                for i in range(64):
                    _chain_kernel[(programs,)](bufs[i % 2], bufs[1 - i % 2], n,
                                               BLOCK=n // programs, PDL=pdl, **kw)  # fmt: skip

            try:
                ms = triton.testing.do_bench_cudagraph(chain, rep=max(rep // 4, 5),
                                                       return_mode="median")  # fmt: skip
            except Exception as e:  # PDL needs sm_90 and a Triton that launches it
                print(f"launch gaps, pdl={pdl}: failed: {e!r}"[:300])
                continue
            us = ms * 1e3 / 64
            rows.append(Row(f"chain kernel{' + PDL' if pdl else ''}", f"{programs} programs",
                            us, 1 / us, "M launches/s", 0.0, graph_us=us))  # fmt: skip
    return rows


def bench_elementwise(tokens: int, copy_gbs: float, rep: int) -> list[Row]:
    """rms_norm (+ residual), rotary and the KV-cache write, each vs its torch reference."""
    from kernels import reference
    from kernels.kv_cache import write_kv_cache
    from kernels.rms_norm import rms_norm
    from kernels.rotary import rotary_embedding

    def row(name: str, shape: str, moved: int, fn: Callable, ref: Callable) -> Row:
        ms, ref_ms = bench(fn, rep), bench(ref, rep)
        gbs = moved / ms / 1e6
        return Row(name, shape, ms * 1e3, gbs, "GB/s", 100 * gbs / copy_gbs,
                   vs_torch=ref_ms / ms)  # fmt: skip

    x = torch.randn(tokens, HIDDEN, dtype=DTYPE, device=DEVICE)
    res, w = torch.randn_like(x), torch.randn(HIDDEN, dtype=DTYPE, device=DEVICE)
    rows = [
        row(
            "rms_norm+residual",
            f"t={tokens} h={HIDDEN}",
            4 * x.numel() * BYTES,
            lambda: rms_norm(x, w, 1e-5, res),
            lambda: reference.rms_norm(x, w, 1e-5, res),
        )
    ]
    pos = torch.randint(0, 8192, (tokens,), device=DEVICE)
    q = torch.randn(tokens, HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    k = torch.randn(tokens, KV_HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    cos_sin = torch.randn(8192, HEAD_DIM, device=DEVICE)
    moved = 2 * (q.numel() + k.numel()) * BYTES + tokens * (8 + HEAD_DIM * 4)
    rows.append(row("rotary", f"t={tokens}", moved, lambda: rotary_embedding(pos, q, k, cos_sin),
                    lambda: reference.rotary_embedding(pos, q, k, cos_sin)))  # fmt: skip
    blocks = -(-tokens // BLOCK_SIZE) * 4
    kc = torch.zeros(blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    vc = torch.zeros_like(kc)
    slots = torch.randperm(blocks * BLOCK_SIZE, device=DEVICE)[:tokens]
    rows.append(row("write_kv_cache", f"t={tokens}", 4 * k.numel() * BYTES + tokens * 8,
                    lambda: write_kv_cache(k, k, kc, vc, slots),
                    lambda: reference.write_kv_cache(k, k, kc, vc, slots)))  # fmt: skip
    return rows


def check(pool: KVPool) -> bool:
    """Each kernel vs its torch reference at real sizes; prints one line per case."""
    from kernels import reference
    from kernels.attention import paged_attention
    from kernels.kv_cache import write_kv_cache
    from kernels.rms_norm import rms_norm
    from kernels.rotary import rotary_embedding

    def report(name: str, got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> bool:
        got, want = got.float(), want.float()
        bad = ((got - want).abs() > atol + rtol * want.abs()) | got.isnan()
        err = (got - want).abs().max().item()
        print(f"check {name:<44} max abs err {err:.2e}  {'ok' if not bad.any() else 'FAIL'}")
        return not bad.any()

    ok = True
    # (q_lens, seq_lens): decode batches (incl. split-K) and prefill with a prefix-cache hit.
    cases = [([1] * 8, [2048, 1, 17, 700, 2048, 999, 64, 1500]), ([1], [8192]),
             ([1024, 300, 1], [1024, 1800, 77])]  # fmt: skip
    for q_lens, seq_lens in cases:
        tables = pool.block_tables(len(seq_lens), max(seq_lens), 1)[0]
        q = torch.randn(sum(q_lens), HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
        lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
        qsl = torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32, device=DEVICE)
        args = (q, pool.k, pool.v, tables, lens, qsl, HEAD_DIM**-0.5)
        got = paged_attention(*args, max_query_len=max(q_lens), max_seq_len=max(seq_lens))
        want = reference.paged_attention(*args)
        ok &= report(
            f"attention q_lens={q_lens[:3]} seq_lens={seq_lens[:3]}", got, want, 2e-2, 2e-2
        )
    # rms_norm / rotary round like the reference; allow 2 bf16 ulps for fp32 rounding noise.
    x = torch.randn(512, HIDDEN, dtype=DTYPE, device=DEVICE)
    res, w = torch.randn_like(x), torch.randn(HIDDEN, dtype=DTYPE, device=DEVICE)
    (out, new_res), (out_ref, res_ref) = (
        rms_norm(x, w, 1e-5, res),
        reference.rms_norm(x, w, 1e-5, res),
    )
    ok &= report("rms_norm out", out, out_ref, 1e-3, 2**-6)
    ok &= report("rms_norm residual", new_res, res_ref, 0, 2**-7)
    pos = torch.randint(0, 8192, (512,), device=DEVICE)
    q = torch.randn(512, HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    k = torch.randn(512, KV_HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    cos_sin = torch.rand(8192, HEAD_DIM, device=DEVICE)
    (q_out, k_out), (q_ref, k_ref) = (
        rotary_embedding(pos, q, k, cos_sin), reference.rotary_embedding(pos, q, k, cos_sin)
    )  # fmt: skip
    ok &= report("rotary q", q_out, q_ref, 1e-3, 2**-6)
    ok &= report("rotary k", k_out, k_ref, 1e-3, 2**-6)
    caches = [torch.randn(128, BLOCK_SIZE, KV_HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
              for _ in range(2)]  # fmt: skip
    caches_ref = [c.clone() for c in caches]
    slots = torch.randperm(128 * BLOCK_SIZE, device=DEVICE)[:512]
    slots[::7] = -1
    write_kv_cache(k, q[:, :KV_HEADS], *caches, slots)
    reference.write_kv_cache(k, q[:, :KV_HEADS], *caches_ref, slots)
    ok &= report("write_kv_cache", torch.cat(caches), torch.cat(caches_ref), 0, 0)
    return ok


def print_table(rows: list[Row], copy_gbs: float, tflops: float) -> None:
    print(f"\ncopy {copy_gbs:.0f} GB/s (read+write), bf16 matmul {tflops:.0f} TFLOP/s")
    head = f"{'kernel':<36} {'shape':<20} {'us':>9} {'graph us':>9} {'rate':>9} {'unit':<8}"
    print(head + f" {'% peak':>7} {'vs torch':>8}")
    for r in rows:
        g = f"{r.graph_us:9.1f}" if r.graph_us is not None else " " * 9
        t = f"{r.vs_torch:7.2f}x" if r.vs_torch is not None else ""
        print(f"{r.kernel:<36} {r.shape:<20} {r.us:9.1f} {g} {r.rate:9.1f} {r.unit:<8} "
              f"{r.pct_peak:6.1f}% {t:>8}")  # fmt: skip


def write_out(path: Path, rows: list[Row], meta: dict) -> None:
    if path.suffix == ".md":
        lines = [f"<!-- {json.dumps(meta)} -->", "",
                 "| kernel | shape | us | graph us | rate | unit | % peak | vs torch |",
                 "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in rows:
            cells = [r.kernel, r.shape, f"{r.us:.1f}",
                     f"{r.graph_us:.1f}" if r.graph_us is not None else "",
                     f"{r.rate:.1f}", r.unit, f"{r.pct_peak:.1f}",
                     f"{r.vs_torch:.2f}x" if r.vs_torch is not None else ""]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        path.write_text("\n".join(lines) + "\n")
    else:
        path.write_text(
            json.dumps({**meta, "rows": [dataclasses.asdict(r) for r in rows]}, indent=1)
        )
    print(f"wrote {path}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="few points, short timing runs")
    p.add_argument("--check", action="store_true", help="validate vs torch references first")
    p.add_argument("--sweep", action="store_true", help="decode (block_n, warps, stages) sweep")
    p.add_argument("--w1", action="store_true", help="tile configs at W1's 8B shapes")
    p.add_argument("--w1-fp8", action="store_true", help="--w1's decode over an fp8 KV cache")
    p.add_argument("--gaps", action="store_true", help="per-kernel time of a graph chain, PDL")
    p.add_argument("--out", type=Path, help="write results (.md: markdown table, else JSON)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU (kernel tests run on CPU: pytest "
              "tests/kernels)", file=sys.stderr)  # fmt: skip
        return 2
    torch.manual_seed(0)
    rep = 20 if args.quick else 100
    batches = (1, 32, 256) if args.quick else (1, 8, 32, 64, 128, 256)
    contexts = (512, 8192) if args.quick else (512, 2048, 8192)
    prefill = ((1, 2048),) if args.quick else ((1, 1024), (1, 4096), (4, 2048), (16, 512))
    pool = KVPool(max(b * c for b in batches for c in contexts) // BLOCK_SIZE + 64)
    if args.check and not check(pool):
        return 1
    copy_gbs, tflops = measure_peaks(args.quick, rep)
    rows = [bench_decode(pool, b, c, copy_gbs, rep) for b in batches for c in contexts]
    if args.sweep:
        configs = itertools.product((32, 64, 128), (4, 8), (2, 3, 4))
        points = ((1, 8192), (64, 2048), (256, 512))
        rows += [bench_decode(pool, b, c, copy_gbs, rep, block_n=n, num_warps=w, num_stages=s)
                 for (n, w, s) in configs for b, c in points]  # fmt: skip
    if args.w1:
        rows += bench_w1(pool, copy_gbs, tflops, rep, args.w1_fp8)
    if args.gaps:
        rows += bench_launch_gaps(rep)
    rows += [bench_prefill(pool, n, length, tflops, rep) for n, length in prefill]
    for tokens in (256,) if args.quick else (1, 256, 4096):
        rows += bench_elementwise(tokens, copy_gbs, rep)
    print_table(rows, copy_gbs, tflops)
    if args.out:
        meta = {
            "card": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
            "command": " ".join(sys.argv), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "copy_gbs": copy_gbs,
            "matmul_tflops": tflops,
        }  # fmt: skip
        write_out(args.out, rows, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
