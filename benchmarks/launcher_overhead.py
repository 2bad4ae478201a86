"""Host (Python) time of the attention launchers a mixed step calls per layer, with the
Triton kernels themselves replaced by no-ops: what the eager attention between piecewise
graphs costs the engine loop per layer, on any machine (no GPU needed; CPU tensors).

    python benchmarks/launcher_overhead.py [--tokens 512] [--decode-rows 249]
"""

import argparse
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import kernels.attention as attention  # noqa: E402
import kernels.kv_cache as kv_cache  # noqa: E402
import kernels.paged_attention as paged  # noqa: E402
import kernels.prefill_attention as prefill  # noqa: E402


class NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--decode-rows", type=int, default=249)
    ap.add_argument("--calls", type=int, default=3000)
    args = ap.parse_args()
    for module in (kv_cache, paged, prefill):
        for name in dir(module):
            if name.startswith("_") and name.endswith("_kernel"):
                setattr(module, name, NoLaunch())
    paged.num_sms = lambda device: 132  # (an H100 / H200's count; no device to ask)
    t, d, heads, kv_heads, dim = args.tokens, args.decode_rows, 32, 8, 64  # Llama-3.2-1B
    bf16 = dict(dtype=torch.bfloat16)
    q, k = torch.randn(t, heads, dim, **bf16), torch.randn(t, kv_heads, dim, **bf16)
    cache = torch.zeros(1000, 16, kv_heads, dim, **bf16)
    positions, slots, cos_sin = torch.arange(t), torch.arange(t), torch.randn(4096, dim)
    reqs = d + 1  # the decode rows, then one prompt chunk
    tables = torch.zeros(reqs, 64, dtype=torch.int32)
    lens = torch.full((reqs,), 300, dtype=torch.int32)
    qsl = torch.tensor([*range(d + 1), t], dtype=torch.int32)
    out = torch.empty_like(q)
    prefill_qsl = qsl[d:] - d  # (once a step, in DeviceInputs.load)
    calls = {
        "rotary + KV write": lambda: kv_cache.rotary_and_write_kv_cache(
            positions, q, k, k, cos_sin, cache, cache, slots
        ),
        "paged_attention (decode rows + prefill)": lambda: attention.paged_attention(
            q,
            cache,
            cache,
            tables,
            lens,
            qsl,
            0.125,
            t - d,
            1024,
            d,
            None,
            None,
            out,
            prefill_qsl,
        ),
    }
    for name, call in calls.items():
        us = timeit.timeit(call, number=args.calls) / args.calls * 1e6
        print(f"{name}: {us:.1f} us per call")


if __name__ == "__main__":
    main()
