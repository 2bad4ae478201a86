"""Factories and tolerances shared by the kernel tests."""

import math

import torch

from kernels import reference
from vllm_runner.model.layers.int4 import quantize_int4

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_IDS = ["fp32", "fp16", "bf16"]
TOL = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.float16: {"atol": 3e-3, "rtol": 3e-3},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}

# One ulp of each dtype, for kernels that round like the reference (norm, rotary, copies).
# NOTE: fp32 rsqrt on the GPU is approximate; Triton's interpreter truncates fp32 -> bf16
# (the GPU rounds to nearest). A kernel that rounds twice (rms_norm) can drift by 2-3 ulps.
ULP = {torch.float32: 1e-5, torch.float16: 2**-10, torch.bfloat16: 2**-7}
ROUNDING_ULPS = 2 if torch.cuda.is_available() else 3


def make_paged_kv(
    seq_lens: list[int],
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    spare_blocks: int = 3,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random K/V caches and a block table whose block ids are shuffled across requests.

    Unused table entries are -1 and spare blocks hold random data, so a kernel that reads
    past a request's context gets garbage instead of a lucky zero.
    """
    per_req = [math.ceil(s / block_size) for s in seq_lens]
    num_blocks = sum(per_req) + spare_blocks
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, device=device).to(dtype)
    v_cache = torch.randn(shape, device=device).to(dtype)
    ids = torch.randperm(num_blocks, device=device).to(torch.int32)
    block_tables = torch.full((len(seq_lens), max(per_req) + 1), -1, dtype=torch.int32)
    block_tables = block_tables.to(device)
    start = 0
    for r, n in enumerate(per_req):
        block_tables[r, :n] = ids[start : start + n]
        start += n
    return k_cache, v_cache, block_tables


def query_start_loc(q_lens: list[int], device: torch.device) -> torch.Tensor:
    """[num_reqs + 1] int32 cumulative query lengths."""
    cum = [0]
    for q in q_lens:
        cum.append(cum[-1] + q)
    return torch.tensor(cum, dtype=torch.int32, device=device)


def int32(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=device)


def ref_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    sliding_window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """The torch reference on fp32 copies (inputs of lower precision upcast exactly)."""
    return reference.paged_attention(
        query.float(), k_cache.float(), v_cache.float(), block_tables, seq_lens,
        query_start_loc, scale, sliding_window, softcap,
    )  # fmt: skip


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert not actual.isnan().any(), "kernel left NaN (unwritten or invalid) elements"
    torch.testing.assert_close(actual.float(), expected.float(), **TOL[dtype])


def make_int4(n: int, k: int, group_size: int, device: torch.device):
    """Random int4 weights whose groups differ in scale (x1 .. x1000 along K) and zero point
    (a shifted mean), so a kernel that reads another group's scale or zero fails."""
    w = torch.randn(n, k, device=device) * 0.05
    group = torch.arange(k, device=device) // group_size
    w = w * 10.0 ** (group % 4).float() + 0.02 * (group % 3 - 1).float()
    return quantize_int4(w, group_size)


def small_card(monkeypatch, fits, record) -> list:
    """Make the int4 tensor-core kernel's launches those of a card whose shared memory takes
    only the tiles ``fits(config)`` accepts (Triton refuses the others before launching, as
    it does on such a card), its memos emptied; returns ``record(config)`` of each launch
    tried, in order."""
    from triton.runtime.errors import OutOfResources

    import kernels.quant_int4_mma as qmma

    launched, real = [], qmma.launch_split

    def card(kernel, x, *args, **kwargs):
        cfg = args[5]
        launched.append(record(cfg))
        if not fits(cfg):
            raise OutOfResources(131_072, 101_376, "shared memory")
        return real(kernel, x, *args, **kwargs)

    monkeypatch.setattr(qmma, "launch_split", card)
    monkeypatch.setattr(qmma, "_UNFIT", {})
    monkeypatch.setattr(qmma, "_FITTED", {})
    return launched
