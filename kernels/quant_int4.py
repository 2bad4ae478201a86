"""Weight-only 4-bit matmul (W4A16, Triton): ``out = x @ dequant(q).T + bias`` with
group-wise asymmetric int4 weights, ``dequant(q)[n, k] = (q[n, k] - zero[n, g]) * scale[n, g]``
for the group ``g = k // group_size``.

Layout (``vllm_runner.model.layers.int4``): ``qweight`` [N, ceil(K / 8)] int32, nibble ``i``
(bits 4i..4i+3) of word ``j`` holding k = 8j + i; ``scale`` [N, num_groups] fp32; ``zero``
[N, num_groups] uint8. Output channels first, as float weights: the linear layers' loaders
shard and merge (q/k/v, gate/up) int4 tensors along dim 0 unchanged.

A K tile lies inside one group (``group_size % BLOCK_K == 0``): its nibbles, minus the
group's zero point, are integers in [-15, 15], exact in bf16 / fp16, so the tensor cores
multiply them with the activations unrounded and the group's scale multiplies the tile's
fp32 partial product. Dequantizing to bf16 first would round every weight to 8 bits of
mantissa. Decode is weight-bandwidth bound (0.5 byte a weight, ~0.04 more for scales and
zeros at group 128); small-M launches split K across programs, as the int8 kernel does.
"""

import dataclasses
import math

import torch
import triton
import triton.language as tl

from kernels.attention_tile import dot_precision
from kernels.launch import cdiv, num_sms
from kernels.pdl import pdl_launch, wait_for_predecessor

NIBBLES = 8  # 4-bit values per int32 word


@triton.jit(do_not_specialize=["M"])  # the token count changes every step: no recompiles
def _w4a16_kernel(
    x_ptr,  # [M, K] fp32 / fp16 / bf16
    w_ptr,  # [N, ceil(K / 8)] int32, packed along K
    scale_ptr,  # [N, num_groups] fp32
    zero_ptr,  # [N, num_groups] uint8
    bias_ptr,  # [N] (HAS_BIAS only)
    out_ptr,  # [SPLIT_K, M, N]: the output itself when SPLIT_K == 1, else fp32 partials
    M,
    N,
    K,
    k_per_split,  # multiple of BLOCK_K
    group_size,  # multiple of BLOCK_K
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_sn,
    stride_sg,
    stride_zn,
    stride_zg,
    stride_os,
    stride_om,
    stride_on,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_predecessor(PDL)
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_word = tl.arange(0, BLOCK_K // 8)
    shifts = tl.arange(0, 8) * 4  # nibble i of a word: bits 4i..4i+3
    m_mask, n_mask = offs_m < M, offs_n < N
    num_words = tl.cdiv(K, 8)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    w_cols = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + offs_k
        x = tl.load(x_rows + ks[None, :] * stride_xk, mask=m_mask[:, None] & (ks < k_hi)[None, :],
                    other=0.0)  # fmt: skip
        # [BLOCK_K / 8, BLOCK_N] words read transposed; the nibbles of a word past K (K % 8)
        # meet x's zeros
        words = k0 // 8 + offs_word
        w_mask = (words < num_words)[:, None] & n_mask[None, :]
        packed = tl.load(w_cols + words[:, None] * stride_wk, mask=w_mask, other=0)
        q = (packed[:, None, :] >> shifts[None, :, None]) & 0xF  # [BLOCK_K / 8, 8, BLOCK_N]
        q = tl.reshape(q, (BLOCK_K, BLOCK_N))  # row 8j + i: nibble i of word j
        g = k0 // group_size
        zero = tl.load(zero_ptr + offs_n * stride_zn + g * stride_zg, mask=n_mask, other=0)
        scale = tl.load(scale_ptr + offs_n * stride_sn + g * stride_sg, mask=n_mask, other=0.0)
        # NOTE: via fp32: Triton 3.9's interpreter casts integers to bf16 as raw bits
        w = (q - zero.to(tl.int32)[None, :]).to(tl.float32).to(x.dtype)
        part = tl.dot(x, w, input_precision=DOT_PRECISION)
        acc += part * scale[None, :]
    if HAS_BIAS:  # added by one split only
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc += bias[None, :] * (pid_k == 0).to(tl.float32)
    out = out_ptr + pid_k * stride_os + offs_m[:, None].to(tl.int64) * stride_om
    tl.store(out + offs_n[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])  # fmt: skip


@dataclasses.dataclass(frozen=True)
class W4A16Config:
    """Tile sizes and launch settings; ``split_k`` cuts K across programs (1 = no split).
    ``block_k`` must divide the group size (a K tile has one scale and zero per column)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            assert v >= 16 and v & (v - 1) == 0, f"{name} {v} must be a power of 2 >= 16"
        assert self.split_k >= 1, f"split_k {self.split_k} must be >= 1"


def group_block_k(group_size: int, limit: int) -> int:
    """The largest power-of-2 K tile <= ``limit`` that divides ``group_size``."""
    return min(limit, group_size & -group_size)


def default_config(m: int, n: int, k: int, group_size: int, sm_count: int) -> W4A16Config:
    """Up to 64 rows (decode) is a weight stream: N tiles of 64 (32 when N is short of two
    programs per SM), K tiles of a whole group of 128, and K split across programs until the
    grid has about two programs per SM. Larger M (prefill) is compute bound: square
    tensor-core tiles, the K tile shorter so that the dequantized [K, N] tile stays small."""
    if m <= 64:
        block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
        block_n = 64 if math.ceil(n / 64) >= 2 * sm_count else 32
        block_k = group_block_k(group_size, 128)
        tiles = math.ceil(m / block_m) * math.ceil(n / block_n)
        split = 1
        if tiles < 2 * sm_count:
            split = max(1, min(math.ceil(2 * sm_count / tiles), math.ceil(k / block_k) // 2, 16))
        return W4A16Config(block_m, block_n, block_k, split, num_warps=4, num_stages=4)
    if m <= 256:
        return W4A16Config(64, 128, group_block_k(group_size, 64), num_warps=4, num_stages=4)
    return W4A16Config(128, 128, group_block_k(group_size, 64), num_warps=8, num_stages=3)


def w4a16_matmul(
    x: torch.Tensor,  # [..., K] fp32 / fp16 / bf16
    qweight: torch.Tensor,  # [N, ceil(K / 8)] int32
    scale: torch.Tensor,  # [N, ceil(K / group_size)] fp32
    zero: torch.Tensor,  # [N, ceil(K / group_size)] uint8, 0..15
    group_size: int,
    bias: torch.Tensor | None = None,  # [N]
    config: W4A16Config | None = None,
) -> torch.Tensor:  # [..., N] in x.dtype
    """Same semantics as ``kernels.reference.w4a16_linear`` (up to fp32 summation order)."""
    assert x.dtype in (torch.float32, torch.float16, torch.bfloat16), f"x {x.dtype}"
    k = x.shape[-1]
    n = qweight.shape[0]
    groups = cdiv(k, group_size)
    assert qweight.dtype == torch.int32 and qweight.shape == (n, cdiv(k, NIBBLES)), (
        f"qweight {qweight.dtype} {tuple(qweight.shape)} must be int32 ({n}, {cdiv(k, 8)}) "
        f"for x {tuple(x.shape)}"
    )
    assert scale.dtype == torch.float32 and scale.shape == (n, groups), (
        f"scale {scale.dtype} {tuple(scale.shape)} must be fp32 ({n}, {groups})"
    )
    assert zero.dtype == torch.uint8 and zero.shape == (n, groups), (
        f"zero {zero.dtype} {tuple(zero.shape)} must be uint8 ({n}, {groups})"
    )
    if bias is not None:
        assert bias.shape == (n,) and bias.is_contiguous(), f"bias {tuple(bias.shape)} vs ({n},)"
    assert x.device == qweight.device == scale.device == zero.device, "inputs on one device"
    x2 = x.reshape(-1, k)  # [M, K]
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out.view(*x.shape[:-1], n)
    cfg = config or default_config(m, n, k, group_size, num_sms(x.device))
    assert group_size % cfg.block_k == 0, (
        f"block_k {cfg.block_k} must divide group_size {group_size} (one scale per K tile)"
    )
    k_per_split = math.ceil(math.ceil(k / cfg.split_k) / cfg.block_k) * cfg.block_k
    split = math.ceil(k / k_per_split)  # rounding can leave fewer non-empty splits
    target = out if split == 1 else torch.empty((split, m, n), dtype=torch.float32,
                                                device=x.device)  # fmt: skip
    grid = (cdiv(m, cfg.block_m), cdiv(n, cfg.block_n), split)
    _w4a16_kernel[grid](
        x2, qweight, scale, zero, bias if bias is not None else scale, target,
        m, n, k, k_per_split, group_size,
        x2.stride(0), x2.stride(1), qweight.stride(0), qweight.stride(1),
        scale.stride(0), scale.stride(1), zero.stride(0), zero.stride(1),
        target.stride(0) if split > 1 else 0, target.stride(-2), target.stride(-1),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        HAS_BIAS=bias is not None, DOT_PRECISION=dot_precision(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_launch(x.device),
    )  # fmt: skip
    if split > 1:
        out = target.sum(0).to(x.dtype)  # fixed reduction order: deterministic
    return out.view(*x.shape[:-1], n)
