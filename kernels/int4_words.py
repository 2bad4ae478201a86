"""What the int4 (W4A16) kernels share: the packed layout's tile loads and nibble conversion,
the output store, the split-K combine, and the launch config (``kernels.quant_int4``: the
one-row GEMV and the dequantize pass; ``kernels.quant_int4_mma``: a few rows on tensor
cores). Layout: ``qweight`` [N, ceil(K / 8)] int32, nibble ``i`` of word ``j`` holding
k = 8j + i; ``scale`` [N, groups] fp32; ``zero`` [N, groups] uint8."""

import dataclasses
import math

import torch
import triton
import triton.language as tl

from kernels.launch import cdiv
from kernels.pdl import pdl_launch

NIBBLES = 8  # 4-bit values per int32 word


@triton.jit
def load_words(w_rows, k0, offs_word, n_mask, num_words, stride_wk, EVEN: tl.constexpr):
    """The [channels, BLOCK_K / 8] words of the K tile at ``k0`` (EVEN: K tiles end at K,
    no mask along the words, so the loads widen)."""
    words = k0 // 8 + offs_word
    mask = n_mask[:, None] if EVEN else n_mask[:, None] & (words < num_words)[None, :]
    return tl.load(w_rows + words[None, :] * stride_wk, mask=mask, other=0)


@triton.jit
def nibble_as_float(packed, i: tl.constexpr):
    """Nibble ``i`` of each word as fp32, exactly, without an int-to-float conversion (a
    quarter-rate instruction on the CUDA cores, which bounded the GEMV): the nibble as the
    low mantissa bits of 2**23 (bits 0x4B000000) is 2**23 + q, less 2**23 is q."""
    bits = ((packed >> (4 * i)) & 0xF) | 0x4B000000
    return bits.to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def store_output(acc, bias_ptr, out_ptr, rows, offs_n, n_mask, out_mask, stride_om, stride_on,
                 HAS_BIAS: tl.constexpr):  # fmt: skip
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def store_or_combine(acc, bias_ptr, out_ptr, partial_ptr, counter_ptr, counter, rows, offs_n,
                     M, N, stride_om, stride_on, HAS_BIAS: tl.constexpr,
                     SPLIT: tl.constexpr):  # fmt: skip
    """Store the [rows, channels] fp32 tile ``acc`` (+ bias) to the output. SPLIT (K cut
    along grid dim 1): each split stores its fp32 partial; the split that finishes last for
    this tile (``counter_ptr[counter]``, acq_rel) sums all of them in split order, so the
    result does not depend on which finished first, and zeroes the counter for the next
    call."""
    n_mask = offs_n < N
    out_mask = (rows < M)[:, None] & n_mask[None, :]
    if SPLIT:
        tile = rows[:, None] * N + offs_n[None, :]
        tl.store(partial_ptr + tl.program_id(1) * M * N + tile, acc, mask=out_mask)
        tl.debug_barrier()  # every warp's partial stored before the release below
        done = tl.atomic_add(counter_ptr + counter, 1)
        if done == tl.num_programs(1) - 1:
            acc = tl.zeros_like(acc)
            for s in range(tl.num_programs(1)):  # the partials other SMs wrote: skip L1
                acc += tl.load(partial_ptr + s * M * N + tile, mask=out_mask, other=0.0,
                               cache_modifier=".cg")  # fmt: skip
            tl.store(counter_ptr + counter, 0)
            store_output(acc, bias_ptr, out_ptr, rows, offs_n, n_mask, out_mask, stride_om,
                         stride_on, HAS_BIAS)  # fmt: skip
    else:
        store_output(acc, bias_ptr, out_ptr, rows, offs_n, n_mask, out_mask, stride_om,
                     stride_on, HAS_BIAS)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class W4A16Config:
    """A W4A16 kernel's tiles: ``block_m`` padded rows, ``block_n`` output channels and
    ``block_k`` inputs a program step (the GEMV's must divide the group size: one scale and
    zero per channel a K tile; the tensor-core kernel's is 128 for any group); ``split_k``
    cuts K across programs."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3  # Triton's software pipeline (the tensor-core kernel's weight copies)

    def __post_init__(self) -> None:
        assert self.block_m >= 1 and self.block_m & (self.block_m - 1) == 0, (
            f"block_m {self.block_m} must be a power of 2"
        )
        for name, least in (("block_n", 1), ("block_k", 16)):
            v = getattr(self, name)
            assert v >= least and v & (v - 1) == 0, f"{name} {v} must be a power of 2 >= {least}"
        assert self.split_k >= 1, f"split_k {self.split_k} must be >= 1"


def group_block_k(group_size: int, limit: int) -> int:
    """The largest power-of-2 K tile <= ``limit`` that divides ``group_size``."""
    return min(limit, group_size & -group_size)


def split_k_launch(k: int, block_k: int, split_k: int) -> tuple[int, int]:
    """(inputs per split, a multiple of ``block_k``; the splits that hold any): rounding
    can leave fewer non-empty splits than asked for."""
    k_per_split = math.ceil(math.ceil(k / split_k) / block_k) * block_k
    return k_per_split, math.ceil(k / k_per_split)


def launch_split(
    kernel,  # a W4A16 ``_kernel`` (its arguments: see kernels.quant_int4's GEMV)
    x: torch.Tensor,  # [M, K]
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
    cfg: W4A16Config,
    row_blocks: int,  # grid dim 2: blocks of ``cfg.block_m`` rows
    **constexprs: object,  # the kernel's own
) -> torch.Tensor:  # [M, N] in x.dtype
    """Launch over (channel blocks, K splits, row blocks); with a split, the fp32 partials
    and the zeroed counters its programs combine through (``store_or_combine``)."""
    m, k = x.shape
    n = qweight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    k_per_split, split = split_k_launch(k, cfg.block_k, cfg.split_k)
    grid = (cdiv(n, cfg.block_n), split, row_blocks)
    partial, counters = out, out  # unread without a split
    if split > 1:
        partial = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
        counters = split_counters(x.device, grid[0] * grid[2])
    kernel[grid](
        x, qweight, scale, zero, bias if bias is not None else scale, out, partial, counters,
        m, n, k, k_per_split, group_size,
        x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1),
        scale.stride(0), scale.stride(1), zero.stride(0), zero.stride(1),
        out.stride(0), out.stride(1),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        HAS_BIAS=bias is not None, SPLIT=split > 1, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **pdl_launch(x.device), **constexprs,
    )  # fmt: skip
    return out


_COUNTERS: dict[torch.device, torch.Tensor] = {}
MAX_TILES = 1 << 16  # a split kernel's output tiles: N up to 1M at 16 channels a tile


def split_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """A split kernel's per-output-tile counters: one zeroed buffer per device, made once
    (CUDA graphs keep its address) and left zeroed by every call. Calls on one stream run one
    after another (a PDL launch waits for its predecessor before touching them)."""
    assert tiles <= MAX_TILES, f"{tiles} output tiles > {MAX_TILES}"
    if device not in _COUNTERS:
        _COUNTERS[device] = torch.zeros(MAX_TILES, dtype=torch.int32, device=device)
    return _COUNTERS[device]
