"""Requesting the next kernel's weights into L2 (Hopper bulk prefetch).

At batch 1 a decode step is a chain of small weight-streaming kernels. Between two of them
the DRAM idles: the last programs of one drain, the next launches and waits for its first
bytes; the decode attention between qkv and o barely reads DRAM at all. A kernel given
``NextWeights`` requests (part of) the weights of a later kernel into L2 as its programs
finish, so those bytes stream in across the gap and the later kernel reads them from L2.
Weights never depend on a kernel's output, so this is safe to do at any time.
"""

import dataclasses
import os

import torch
import triton
import triton.language as tl

_THREADS: tl.constexpr = tl.constexpr(128)  # prefetch lanes per program (4 warps: one each)
_MIN_BYTES: tl.constexpr = tl.constexpr(256)  # smallest request one lane issues


@dataclasses.dataclass(frozen=True)
class NextWeights:
    """The bytes a later kernel streams first: ``nbytes`` (a multiple of 16) from the start
    of ``weight`` and, where ``second`` > 0, as many from byte ``second`` on (a gated weight's
    up rows, read alongside its gate rows)."""

    weight: torch.Tensor
    nbytes: int
    second: int = 0

    def kernel_args(self) -> tuple:
        return self.weight, self.nbytes, self.second


def l2_prefetch_bytes() -> int:
    """The most bytes of the next weight a kernel requests into L2
    (``VLLM_RUNNER_L2_PREFETCH_MB``, 0 turns prefetching off)."""
    return int(float(os.environ.get("VLLM_RUNNER_L2_PREFETCH_MB", "16")) * (1 << 20))


def next_weights(
    weight: torch.Tensor | None, gated: bool = False, max_bytes: int | None = None
) -> NextWeights | None:
    """What a kernel should request into L2 for a later kernel that streams ``weight`` [N, K]
    row by row (gated: [gate; up] rows, read in step): its first ``max_bytes``
    (``l2_prefetch_bytes()`` by default), split between the halves when gated. None where the
    hardware cannot (before sm_90), the weight is not 16-byte aligned or the cap is 0."""
    cap = l2_prefetch_bytes() if max_bytes is None else max_bytes
    if weight is None or cap <= 0 or not _capable(weight):
        return None
    total = weight.numel() * weight.element_size()
    if gated:
        half = total // 2
        if half % 16:
            return None
        return NextWeights(weight, min(half, cap // 2) // 16 * 16, half)
    return NextWeights(weight, min(total, cap) // 16 * 16)


def _capable(weight: torch.Tensor) -> bool:
    return (
        weight.is_cuda
        and weight.is_contiguous()
        and weight.data_ptr() % 16 == 0
        and torch.cuda.get_device_capability(weight.device)[0] >= 9
    )


@triton.jit
def prefetch_next(ptr, nbytes, second):
    """This program's share of ``NextWeights`` (ptr, nbytes, second) into L2: the range is
    cut evenly over the grid's programs and their lanes, one bulk request per lane."""
    part, parts = tl.program_id(0), tl.num_programs(0)
    base = ptr.to(tl.pointer_type(tl.int8), bitcast=True)
    _prefetch_share(base, nbytes, part, parts)
    if second > 0:
        _prefetch_share(base + second, nbytes, part, parts)


@triton.jit
def _prefetch_share(base, nbytes, part, parts):
    per_lane = tl.maximum(tl.cdiv(tl.cdiv(nbytes, 16), parts * _THREADS) * 16, _MIN_BYTES)
    offs = (part * _THREADS + tl.arange(0, _THREADS)).to(tl.int64) * per_lane
    size = tl.minimum(nbytes - offs, per_lane).to(tl.int32)
    tl.inline_asm_elementwise(
        asm="""{
        .reg .pred p;
        setp.gt.s32 p, $2, 0;
        @p cp.async.bulk.prefetch.L2.global [$1], $2;
        mov.b32 $0, 0;
        }""",
        constraints="=r,l,r",
        args=[base + offs, size],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )

