"""Tile configs at W1's shapes on the 8B model (``python benchmarks/kernels.py --w1``): decode
attention over a 256-row step, prefill attention over a 16384-token step, and the 8B linear
layers by BLAS library."""

import dataclasses
import itertools

import torch
from kernel_bench import BLOCK_SIZE, DEVICE, DTYPE, HEAD_DIM, HEADS, KV_HEADS, KVPool, Row, bench


@dataclasses.dataclass
class W1Decode:
    """A 256-row decode step of W1 on the 8B heads, as the engine runs it: contexts of 64-1280
    keys in shuffled blocks; ``new``: rotate q and the new key, write it and its value at the
    last position of each context, attend; ``order``: longest context first."""

    lens: torch.Tensor  # on the host
    tables: torch.Tensor
    seq_lens: torch.Tensor
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    new: object  # kernels.paged_attention.NewTokens
    order: torch.Tensor


def w1_decode_step(pool: KVPool, gen: torch.Generator, fp8: bool = False) -> W1Decode:
    """W1's decode step over ``pool``'s blocks (``fp8``: over an e4m3 copy of the blocks it
    uses, shuffled anew); contexts drawn from ``gen``."""
    from kernels.paged_attention import NewTokens

    lens = torch.randint(64, 1281, (256,), generator=gen)
    per_seq = -(-int(lens.max()) // BLOCK_SIZE)
    tables = pool.perm[: 256 * per_seq].view(256, per_seq)
    seq_lens = lens.to(torch.int32).to(DEVICE)
    q = torch.randn(256, HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    k_cache, v_cache = pool.k, pool.v
    if fp8:
        k_cache, v_cache = (c[: 256 * per_seq].to(torch.float8_e4m3fn) for c in (k_cache, v_cache))
        tables = torch.randperm(256 * per_seq, device=DEVICE).to(torch.int32).view(256, per_seq)
    positions = (lens - 1).to(DEVICE)
    slots = tables.gather(1, (positions // BLOCK_SIZE)[:, None])[:, 0].long() * BLOCK_SIZE
    new_kv = torch.randn(256, KV_HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    new = NewTokens(positions, new_kv, new_kv, torch.rand(2048, HEAD_DIM, device=DEVICE),
                    slots + positions % BLOCK_SIZE)  # fmt: skip
    order = torch.argsort(seq_lens, descending=True).to(torch.int32)
    return W1Decode(lens, tables, seq_lens, q, k_cache, v_cache, new, order)


def bench_w1(pool: KVPool, copy_gbs: float, tflops: float, rep: int, fp8: bool) -> list[Row]:
    """Tile configs at W1's shapes on the 8B model (--w1): a 256-row decode step over contexts
    of 64-1280 tokens (``fp8``: over an e4m3 copy of the cache), and a 16384-token step of
    whole prompts of 64-1024 tokens."""
    import triton.testing

    from kernels.paged_attention import paged_attention_decode
    from kernels.prefill_attention import prefill_attention

    gen = torch.Generator().manual_seed(1)
    rows = []
    step = w1_decode_step(pool, gen, fp8)
    q, tables, seq_lens, new = step.q, step.tables, step.seq_lens, step.new
    k_cache, v_cache = step.k_cache, step.v_cache
    configs = [(64, 4, 2), (64, 4, 3), (64, 8, 2), (128, 4, 2), (128, 8, 2), (128, 8, 3),
               (32, 4, 2), (32, 4, 3), (64, 2, 2), (32, 2, 2)]  # fmt: skip
    if fp8:
        configs += [(128, 4, 3), (256, 4, 2), (256, 8, 2), (256, 8, 3), (128, 2, 2), (64, 4, 4)]
    kv_bytes = 2 * int(step.lens.sum()) * KV_HEADS * HEAD_DIM * k_cache.element_size()
    rope = [(64, 4, 2), (32, 4, 2), (64, 8, 2), (128, 8, 2), (32, 4, 3)]
    cache = "fp8 " if fp8 else ""
    order = step.order
    runs = [(*c, None, None) for c in configs] + [(*c, new, None) for c in rope]
    runs += [(*c, nt, order) for c in [(64, 4, 2), (128, 8, 2), (64, 2, 2)] for nt in (None, new)]
    for n, w, s, nt, od in runs:

        def run(n=n, w=w, s=s, nt=nt, od=od):
            return paged_attention_decode(
                q, k_cache, v_cache, tables, seq_lens, HEAD_DIM**-0.5, num_splits=1,
                block_n=n, num_warps=w, num_stages=s, new_tokens=nt, order=od,
            )  # fmt: skip

        ms = triton.testing.do_bench_cudagraph(run, rep=max(rep // 4, 5), return_mode="median")
        gbs = kv_bytes / ms / 1e6
        name = f"w1 {cache}decode{'+rope' if nt else ''}{' ordered' if od is not None else ''}"
        name += f"[n={n} w={w} s={s}]"
        rows.append(Row(name, "b=256 ctx=64-1280", ms * 1e3, gbs, "GB/s", 100 * gbs / copy_gbs,
                        graph_us=ms * 1e3))  # fmt: skip
    lens, total = [], 0
    while total < 16384:
        length = min(int(torch.randint(64, 1025, (1,), generator=gen)), 16384 - total)
        lens.append(length)
        total += length
    per_seq = -(-max(lens) // BLOCK_SIZE)
    tables = pool.perm[: len(lens) * per_seq].view(len(lens), per_seq)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    qsl = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=DEVICE)
    q = torch.randn(total, HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    flops = sum(4 * HEADS * HEAD_DIM * x * (x + 1) / 2 for x in lens)
    for m, n, w, s, g in [(128, 64, 8, 3, 1), (128, 64, 4, 3, 1), (128, 128, 8, 3, 1),
                          (64, 64, 4, 3, 1), (128, 32, 4, 4, 1), (64, 128, 4, 3, 1),
                          (32, 32, 4, 4, 4), (64, 64, 8, 3, 4), (32, 64, 4, 3, 4)]:  # fmt: skip

        def run(m=m, n=n, w=w, s=s, g=g):
            return prefill_attention(q, pool.k, pool.v, tables, seq_lens, qsl, 0.088,
                                     block_m=m, block_n=n, num_warps=w, num_stages=s,
                                     group=g)  # fmt: skip

        ms = bench(run, rep)
        rate = flops / ms / 1e9
        rows.append(Row(f"w1 prefill[m={m} n={n} w={w} s={s} g={g}]",
                        f"{len(lens)} prompts, {total}", ms * 1e3, rate, "TFLOP/s",
                        100 * rate / tflops))  # fmt: skip
    # The 8B linear layers at a decode step (M 256) and a full step (M 16384), by BLAS library.
    for lib in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(lib)
        for m in (256, 16384):
            for n, k in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]:
                a = torch.randn(m, k, dtype=DTYPE, device=DEVICE)
                wt = torch.randn(n, k, dtype=DTYPE, device=DEVICE)
                ms = triton.testing.do_bench_cudagraph(
                    lambda a=a, wt=wt: torch.nn.functional.linear(a, wt), rep=max(rep // 4, 5),
                    return_mode="median")  # fmt: skip
                rate = 2 * m * n * k / ms / 1e9
                rows.append(Row(f"linear[{lib}]", f"m={m} n={n} k={k}", ms * 1e3, rate,
                                "TFLOP/s", 100 * rate / tflops, graph_us=ms * 1e3))  # fmt: skip
    torch.backends.cuda.preferred_blas_library("cublas")
    return rows
