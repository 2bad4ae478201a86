"""The harness benchmarks/kernels.py and benchmarks/kernels_w1.py share: Llama-3-8B attention
shapes, a result row, median timing, the card's measured copy bandwidth and matmul rate, and
a shuffled paged KV pool (see benchmarks/kernels.py for the conventions)."""

import dataclasses
from collections.abc import Callable

import torch

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, HIDDEN = 32, 8, 128, 16, 4096
DTYPE = torch.bfloat16
BYTES = 2  # bf16
DEVICE = "cuda"


@dataclasses.dataclass
class Row:
    kernel: str
    shape: str
    us: float  # median do_bench time
    rate: float  # GB/s or TFLOP/s
    unit: str
    pct_peak: float  # of measured copy bandwidth or matmul rate
    graph_us: float | None = None  # decode: per call inside a CUDA graph
    vs_torch: float | None = None  # torch reference time / kernel time


def bench(fn: Callable[[], object], rep: int) -> float:
    """Median milliseconds of ``fn`` (triton.testing.do_bench, L2 flushed before each run)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=max(rep // 4, 5), rep=rep, return_mode="median")


def measure_peaks(quick: bool, rep: int) -> tuple[float, float]:
    """(copy GB/s counting read + write, bf16 matmul TFLOP/s) measured on this card."""
    src = torch.empty(1 << 29, dtype=DTYPE, device=DEVICE).normal_()  # 1 GiB
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() * BYTES / bench(lambda: dst.copy_(src), rep) / 1e6
    n = 4096 if quick else 8192
    a = torch.randn(n, n, dtype=DTYPE, device=DEVICE)
    b = torch.randn(n, n, dtype=DTYPE, device=DEVICE)
    tflops = 2 * n**3 / bench(lambda: a @ b, rep) / 1e9
    return copy_gbs, tflops


class KVPool:
    """One big bf16 K/V cache; callers take disjoint, shuffled runs of its blocks."""

    def __init__(self, num_blocks: int) -> None:
        shape = (num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
        self.k = torch.empty(shape, dtype=DTYPE, device=DEVICE).normal_()
        self.v = torch.empty(shape, dtype=DTYPE, device=DEVICE).normal_()
        self.perm = torch.randperm(num_blocks, device=DEVICE).to(torch.int32)

    def block_tables(self, batch: int, ctx: int, copies: int) -> list[torch.Tensor]:
        per_seq = -(-ctx // BLOCK_SIZE)
        need = batch * per_seq
        assert need * copies <= self.perm.numel(), "KV pool too small"
        return [self.perm[i * need : (i + 1) * need].view(batch, per_seq) for i in range(copies)]


def l2_bytes() -> int:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 50 << 20))
