"""Sliding-window attention on Gemma shapes (CUDA only): decode and prefill time with the
window against full attention over the same long contexts (the window's kernels skip the key
tiles before it, so their time should follow the window, not the context), the soft-cap's
cost, and the prefill tile configs at head_dim 256. bf16, block_size 16, shuffled tables.

Rows: Gemma-2-9B heads (16 x 256, 8 kv heads, window 4096, cap 50) and Gemma-3-4B heads
(8 x 256, 4 kv heads, window 1024); decode batches 1 / 64 / 256 at a 16384-key context,
prefill one 16384-token prompt and a 2048-token chunk after 14336 cached keys.

    python benchmarks/window_probe.py [out.json]
"""

import functools
import json
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels.paged_attention import paged_attention_decode  # noqa: E402
from kernels.prefill_attention import prefill_attention  # noqa: E402

BS, DEV, DT = 16, "cuda", torch.bfloat16
SHAPES = {"gemma2_9b": (16, 8, 4096, 50.0), "gemma3_4b": (8, 4, 1024, 0.0)}


def caches(seq_lens: list[int], kv_heads: int) -> tuple[torch.Tensor, ...]:
    per = [-(-s // BS) for s in seq_lens]
    ids = torch.randperm(sum(per), device=DEV).to(torch.int32)
    tables = torch.zeros(len(seq_lens), max(per), dtype=torch.int32, device=DEV)
    start = 0
    for r, n in enumerate(per):
        tables[r, :n] = ids[start : start + n]
        start += n
    k = torch.randn(sum(per), BS, kv_heads, 256, device=DEV, dtype=DT)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    return k, torch.randn_like(k), tables, lens


def time_us(fn) -> float:  # noqa: ANN001
    return triton.testing.do_bench_cudagraph(fn, rep=200) * 1e3


def main() -> None:
    rows = []
    for name, (heads, kv, window, cap) in SHAPES.items():
        for batch in (1, 64, 256):
            k, v, tables, lens = caches([16384] * batch, kv)
            q = torch.randn(batch, heads, 256, device=DEV, dtype=DT)
            for w, c in ((0, 0.0), (window, 0.0), (window, cap), (0, cap)):
                us = time_us(functools.partial(paged_attention_decode, q, k, v, tables, lens,
                                               256**-0.5, sliding_window=w, softcap=c))  # fmt: skip
                rows.append(dict(shape=name, kernel="decode", batch=batch, window=w, cap=c, us=us))
                print(rows[-1], flush=True)
        for case, (q_lens, seq_lens) in {"n1_16384": ([16384], [16384]),
                                         "chunk_2048": ([2048], [16384])}.items():  # fmt: skip
            k, v, tables, lens = caches(seq_lens, kv)
            q = torch.randn(sum(q_lens), heads, 256, device=DEV, dtype=DT)
            qsl = torch.tensor([0, sum(q_lens)], dtype=torch.int32, device=DEV)
            configs = [{}, dict(block_m=32, block_n=64, num_warps=8, num_stages=2, group=2),
                       dict(block_m=16, block_n=32, num_warps=4, num_stages=2, group=2),
                       dict(block_m=64, block_n=32, num_warps=8, num_stages=2,
                            group=2)]  # fmt: skip
            for cfg in configs:
                for w, c in ((0, 0.0), (window, cap)):
                    us = time_us(functools.partial(prefill_attention, q, k, v, tables, lens, qsl,
                                                   256**-0.5, sliding_window=w, softcap=c,
                                                   **cfg))  # fmt: skip
                    rows.append(dict(shape=name, kernel="prefill", case=case, cfg=cfg, window=w,
                                     cap=c, us=us))  # fmt: skip
                    print(rows[-1], flush=True)
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
