"""Compile every kernel for an H100 (sm_90) on a machine without a GPU.

The interpreter runs kernels as numpy code, so it misses what only the GPU compiler checks:
loop-carried type changes, tl.dot shape/dtype rules, shared memory over the per-block limit,
or a dot that silently falls back from tensor cores. This test launches each launcher with
the kernel swapped for a recorder that compiles it through Triton's real pipeline (ptxas
included) for ``GPUTarget("cuda", 90, 32)``. It runs in a subprocess because the kernel
tests' conftest sets TRITON_INTERPRET for this process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

H100_SHARED_BYTES = 227 * 1024
PTR_TYPES = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16", "int32": "*i32",
             "int64": "*i64", "int8": "*i8", "int16": "*i16",
             "uint8": "*u8", "float8_e4m3fn": "*fp8e4nv"}  # fmt: skip
KERNELS = {
    "_write_kv_cache_kernel", "_rotary_write_kv_kernel", "_decode_kernel",
    "_decode_reduce_kernel", "_prefill_kernel", "_rms_norm_kernel", "_rotary_kernel",
    "_silu_and_mul_kernel", "_w8a16_kernel", "_gemv_kernel", "_fp8_quantize_rows_kernel",
    "_sample_kernel", "_w4a16_gemv_kernel", "_int4_dequantize_kernel", "_w4a16_mma_kernel",
    "_fused_moe_kernel", "_expert_count_kernel", "_align_pairs_kernel",
    "_w4a16_gemv_half2_kernel",
}  # fmt: skip
KERNELS_INT4 = ["_w4a16_gemv_kernel"] + ["_w4a16_mma_kernel"] * 6 + ["_int4_dequantize_kernel"]


class _Recorder:
    """Stands in for ``kernel[grid](...)``: compiles for sm_90 and records the result."""

    def __init__(self, name: str, fn: object, results: list[dict]) -> None:
        self.name, self.fn, self.results = name, fn, results

    def __getitem__(self, grid: tuple[int, ...]):  # noqa: ANN204
        return self._compile

    def _compile(self, *args: object, **kwargs: object) -> None:
        import torch
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        kwargs.pop("launch_pdl", None)  # a launch attribute, not a kernel argument
        signature, constexprs, attrs = {}, dict(kwargs), {}
        for i, (name, arg) in enumerate(zip(self.fn.arg_names, args, strict=False)):
            if isinstance(arg, torch.Tensor):
                signature[name] = PTR_TYPES[str(arg.dtype).removeprefix("torch.")]
                attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
            elif isinstance(arg, float):
                signature[name] = "fp32"
            elif arg == 1:  # triton specializes integer 1 to a constant
                signature[name], constexprs[name] = "constexpr", 1
            else:
                signature[name] = "i32"
                if arg % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        signature.update({k: "constexpr" for k in kwargs})
        src = ASTSource(self.fn, signature, constexprs, attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
        ptx = kernel.asm["ptx"]
        mma = "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else "none"
        self.results.append({"kernel": self.name, "dtype": str(args[0].dtype),
                             "shared": kernel.metadata.shared, "mma": mma,
                             "block_m": kwargs.get("BLOCK_M"),
                             "group_tiles": kwargs.get("GROUP_TILES"),
                             "smem_stores": kernel.asm["ttgir"].count("ttg.local_alloc %"),
                             "barrier_between": _barrier_between_store_and_copy(
                                 ptx, kernel.asm["ttgir"]) if kwargs.get("ROPE") else None,
                             })  # fmt: skip


def _barrier_between_store_and_copy(ptx: str, ttgir: str) -> bool:
    """Whether a CTA barrier separates the fused decode kernel's writes of the new key /
    value from the tile loop's first copy that could read them back: in the PTX (what the
    GPU runs) and in the TTGIR (the kernel's own barrier, not one Triton happened to add)."""

    def ordered(text: str, store: str, barrier: str, copy: str) -> bool:
        lines = text.splitlines()
        first_copy = next((i for i, line in enumerate(lines) if copy in line), len(lines))
        stores = [i for i, line in enumerate(lines[:first_copy]) if store in line]
        return bool(stores) and any(barrier in line for line in lines[stores[-1] : first_copy])

    return ordered(ptx, "st.global", "bar.sync", "cp.async") and ordered(
        ttgir, "tt.store", "barrier", "async_copy_global_to_local"
    )


def _compile_all() -> list[dict]:
    import torch

    import kernels.activation as ac
    import kernels.decode_splits as ds
    import kernels.fused_moe as fm
    import kernels.gemv as qg
    import kernels.kv_cache as kv
    import kernels.moe_align as ma
    import kernels.paged_attention as pa
    import kernels.pdl
    import kernels.prefill_attention as pf
    import kernels.quant_int4 as qi
    import kernels.quant_int4_half2 as qh
    import kernels.quant_int4_mma as qmma
    import kernels.quant_matmul as qm
    import kernels.rms_norm as rn
    import kernels.rotary as ro
    import kernels.sampling as sm

    kernels.pdl.pdl_enabled = lambda device: True  # compile the in-kernel PDL waits too
    qm.ptx_widening = lambda device: True  # and the inline-PTX int8 / e4m3 widening
    pa.ptx_widening = lambda device: True  # (weights, and an fp8 KV cache's word pairs)
    qmma.ptx_unpack = lambda device: True  # and the int4 tensor-core kernel's nibble pairs
    results: list[dict] = []
    sm._programs = lambda device: 66  # (an H100's half: split rows, their barriers compiled)
    for mod in (ac, ds, fm, kv, ma, pa, pf, qg, qi, qh, qmma, qm, rn, ro, sm):
        for name in KERNELS & set(vars(mod)):
            setattr(mod, name, _Recorder(name, getattr(mod, name), results))
    bt = torch.zeros(4, 16, dtype=torch.int32)
    lens, qsl = torch.full((4,), 100, dtype=torch.int32), torch.arange(5, dtype=torch.int32)
    for dtype, head_dim in [(torch.bfloat16, 128), (torch.float16, 80), (torch.float32, 128),
                            (torch.bfloat16, 64)]:  # fmt: skip
        cache = torch.empty(64, 16, 8, head_dim, dtype=dtype)
        q = torch.empty(4, 32, head_dim, dtype=dtype)
        pa.paged_attention_decode(q, cache, cache, bt, lens, 0.1, num_splits=4)
        pa.paged_attention_decode(q, cache, cache, bt, lens, 0.1, num_splits=1)
        new_kv = torch.empty(4, 8, head_dim, dtype=dtype)
        rope = pa.NewTokens(torch.zeros(4, dtype=torch.long), new_kv, new_kv, torch.empty(64, 64),
                            torch.zeros(4, dtype=torch.long))  # fmt: skip
        pa.paged_attention_decode(q, cache, cache, bt, lens, 0.1, num_splits=4, new_tokens=rope)
        lone = pa.NewTokens(torch.zeros(1, dtype=torch.long), new_kv[:1], new_kv[:1],
                            torch.empty(64, 64), torch.zeros(1, dtype=torch.long))  # fmt: skip
        pa.paged_attention_decode(q[:1], cache, cache, bt[:1], lens[:1], 0.1, new_tokens=lone)
        pf.prefill_attention(q, cache, cache, bt, lens, qsl, 0.1)
    # Gemma: head_dim 256, a sliding window and soft-capped scores (the full-attention code
    # above does not change with these options: they are compile-time)
    for dtype, kv_dtype in [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                            (torch.float16, torch.float8_e4m3fn)]:  # fmt: skip
        opts = dict(sliding_window=4096, softcap=50.0)
        cache = torch.empty(64, 16, 8, 256, dtype=kv_dtype)
        q = torch.empty(4, 16, 256, dtype=dtype)
        pa.paged_attention_decode(q, cache, cache, bt, lens, 0.1, num_splits=4, **opts)
        pf.prefill_attention(q, cache, cache, bt, lens, qsl, 0.1, **opts)
    new_kv = torch.empty(4, 8, 256, dtype=torch.bfloat16)
    rope = pa.NewTokens(torch.zeros(4, dtype=torch.long), new_kv, new_kv, torch.empty(64, 256),
                        torch.zeros(4, dtype=torch.long))  # fmt: skip
    cache = torch.empty(64, 16, 8, 256, dtype=torch.bfloat16)
    pa.paged_attention_decode(torch.empty(4, 16, 256, dtype=torch.bfloat16), cache, cache, bt,
                              lens, 0.1, new_tokens=rope, sliding_window=512)  # fmt: skip
    for head_dim in (64, 128):  # 2, 8, 16 query heads per kv head: the other grouped tiles
        for heads in (16, 64, 128):
            cache = torch.empty(64, 16, 8, head_dim, dtype=torch.bfloat16)
            q = torch.empty(4, heads, head_dim, dtype=torch.bfloat16)
            pf.prefill_attention(q, cache, cache, bt, lens, qsl, 0.1)
    # an fp8 (e4m3) KV cache: widened to the query's dtype on load, rounded on store
    cache = torch.empty(64, 16, 8, 128, dtype=torch.float8_e4m3fn)
    q, new_kv = torch.empty(4, 32, 128, dtype=torch.bfloat16), torch.empty(4, 8, 128).bfloat16()
    rope = pa.NewTokens(torch.zeros(4, dtype=torch.long), new_kv, new_kv, torch.empty(64, 64),
                        torch.zeros(4, dtype=torch.long))  # fmt: skip
    pa.paged_attention_decode(q, cache, cache, bt, lens, 0.1, num_splits=4, new_tokens=rope)
    pa.paged_attention_decode(q, cache, cache, bt, lens, 0.1, num_splits=1)
    pf.prefill_attention(q, cache, cache, bt, lens, qsl, 0.1)
    for head_dim in (16, 80):  # not word pairs (dots of K < 16; unaligned word rows)
        small = torch.empty(64, 16, 8, head_dim, dtype=torch.float8_e4m3fn)
        pa.paged_attention_decode(torch.empty(4, 32, head_dim, dtype=torch.bfloat16), small,
                                  small, bt, lens, 0.1, num_splits=1)  # fmt: skip
    kv.write_kv_cache(new_kv, new_kv, cache, cache, torch.zeros(4, dtype=torch.long))
    kv.rotary_and_write_kv_cache(torch.zeros(4, dtype=torch.long), q, new_kv, new_kv,
                                 torch.empty(64, 128), cache, cache,
                                 torch.zeros(4, dtype=torch.long))  # fmt: skip
    x = torch.empty(4, 4096, dtype=torch.bfloat16)
    rn.rms_norm(x, torch.empty(4096, dtype=torch.bfloat16), 1e-5, x)
    q, k = (
        torch.empty(4, 32, 128, dtype=torch.bfloat16),
        torch.empty(4, 8, 128, dtype=torch.bfloat16),
    )
    ro.rotary_embedding(torch.zeros(4, dtype=torch.long), q, k, torch.empty(64, 128))
    kv.write_kv_cache(k, k, torch.empty(8, 16, 8, 128, dtype=torch.bfloat16),
                      torch.empty(8, 16, 8, 128, dtype=torch.bfloat16),
                      torch.zeros(4, dtype=torch.long))  # fmt: skip
    for head_dim, rotary_dim in [(128, 128), (80, 32)]:
        q, k = torch.empty(4, 32, head_dim), torch.empty(4, 8, head_dim)
        cache = torch.empty(8, 16, 8, head_dim)
        kv.rotary_and_write_kv_cache(
            torch.zeros(4, dtype=torch.long), q.bfloat16(), k.bfloat16(), k.bfloat16(),
            torch.empty(64, rotary_dim), cache.bfloat16(), cache.bfloat16(),
            torch.zeros(4, dtype=torch.long),
        )  # fmt: skip
    ac.silu_and_mul(torch.empty(4, 2 * 4096, dtype=torch.bfloat16))
    qm.fp8_quantize_rows(torch.empty(4, 4096, dtype=torch.bfloat16))
    # int8 and fp8 weights through the GEMV (one row) and the tiled kernel, whole and ragged
    # tiles (the masked loads of fp8 pointers are what the interpreter cannot check).
    for wdtype in (torch.int8, torch.float8_e4m3fn):
        for m, n, k in [(1, 4096, 4096), (1, 72, 300), (16, 4096, 4096), (19, 72, 300),
                        (300, 4096, 4096)]:  # fmt: skip
            for gated in (False, True):  # gated: the fused SiLU-and-mul epilogue
                qm.w8a16_matmul(torch.empty(m, k, dtype=torch.bfloat16),
                                torch.empty(n, k, dtype=wdtype), torch.empty(n),
                                gated=gated)  # fmt: skip
    # int4 weights (groups of 128; 32: a shorter K tile): the GEMV at one row with split K; the
    # tensor-core kernel (2 rows, ragged N and K; group tiles with split K at 16 rows, and at
    # 32 with K not a multiple of the tile; groups of 32 inside a tile, ragged, at 8 and 40
    # rows; 64 rows a program); the dequantize pass of more rows
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for m, n, k, group in [(1, 4096, 4096, 128), (2, 72, 300, 32), (16, 4096, 4096, 128),
                               (24, 4096, 4000, 128), (8, 72, 300, 32), (40, 72, 300, 32),
                               (48, 4096, 4096, 128), (256, 4096, 4096, 128)]:  # fmt: skip
            groups = -(-k // group)
            qi.w4a16_matmul(torch.empty(m, k, dtype=dtype),
                            torch.empty(n, -(-k // 8), dtype=torch.int32),
                            torch.empty(n, groups), torch.empty(n, groups, dtype=torch.uint8),
                            group, torch.empty(n, dtype=dtype))  # fmt: skip
    # the packed-half GEMV (one 16-bit row on a GPU: called directly, the dispatch sees CPU
    # tensors here): whole and ragged K, a group of 256
    for dtype in (torch.bfloat16, torch.float16):
        for n, k, group in [(4096, 4096, 128), (72, 1004, 128), (72, 1536, 256)]:
            groups = -(-k // group)
            qh.w4a16_gemv_half2(torch.empty(1, k, dtype=dtype),
                                torch.empty(n, -(-k // 8), dtype=torch.int32),
                                torch.empty(n, groups), torch.empty(n, groups, dtype=torch.uint8),
                                group)  # fmt: skip
    # MoE: the routing step in one launch (decode) and two (chunks), at 8 / 128 experts; the
    # grouped GEMMs (gate / up with SiLU-mul, down with the routing weight) at decode's tiles
    # and prefill's (128 x 128 bf16, 64 x 64 fp32; programs grouped)
    for tokens, experts, top_k in [(4, 8, 2), (300, 128, 8)]:
        ma.align_pairs(torch.zeros(tokens, top_k, dtype=torch.int32), experts, 16)
    for dtype in (torch.bfloat16, torch.float32):
        for tokens in (16, 256):
            fm.fused_moe(torch.empty(tokens, 256, dtype=dtype),
                         torch.empty(8, 2 * 128, 256, dtype=dtype),
                         torch.empty(8, 256, 128, dtype=dtype), torch.rand(tokens, 2),
                         torch.zeros(tokens, 2, dtype=torch.int32))  # fmt: skip
    # 16-bit weights through the GEMV with each of the decode layer's fusions
    for wdtype in (torch.bfloat16, torch.float16):
        for n, k in [(4096, 4096), (72, 300)]:
            x, w = torch.empty(1, k, dtype=wdtype), torch.empty(2 * n, k, dtype=wdtype)
            norm = (torch.empty(k, dtype=wdtype), 1e-5)
            qg.linear_one_row(x, w[:n], residual=torch.empty(1, n, dtype=wdtype))
            qg.linear_one_row(x, w, gated=True, norm=norm)
            qg.linear_one_row(x, w[:n], torch.empty(n, dtype=wdtype), norm=norm)
    for dtype in (torch.bfloat16, torch.float32):  # a row split over 32 programs
        sm.sample_rows(torch.empty(2, 128256, dtype=dtype), torch.empty(2, 4),
                       torch.empty(2, dtype=torch.int64), split=32)  # fmt: skip
    return results


def test_kernels_compile_for_sm90() -> None:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(90).path
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"triton has no usable ptxas for sm_90: {exc}")
    if not Path(ptxas).exists():
        pytest.skip(f"ptxas not found at {ptxas}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.splitlines()[-1])
    assert {r["kernel"] for r in results} == KERNELS
    for r in results:
        assert r["shared"] <= H100_SHARED_BYTES, r
        if r["kernel"] in ("_decode_kernel", "_prefill_kernel") and r["dtype"] != "torch.float32":
            assert r["mma"] != "none", f"attention dot fell off the tensor cores: {r}"
        assert r["barrier_between"] in (None, True), f"new key read before the barrier: {r}"
    assert sum(r["barrier_between"] is True for r in results) == 10, results  # 10 fused decodes
    prefill_bf16 = [r for r in results if r["kernel"] == "_prefill_kernel" and "bf" in r["dtype"]]
    assert prefill_bf16[0]["mma"] == "wgmma", prefill_bf16
    int4 = [r["kernel"] for r in results if r["kernel"] in KERNELS_INT4]
    assert sorted(int4) == sorted(KERNELS_INT4 * 3), int4  # each for bf16, fp16, fp32
    w4_mma = [r for r in results if r["kernel"] == "_w4a16_mma_kernel" and "32" not in r["dtype"]]
    assert len(w4_mma) == 12 and all(r["mma"] != "none" for r in w4_mma), w4_mma
    # the fused MoE's largest program (prefill tiles, gate / up) takes the shared memory that
    # choose_tiles reckons with when it fits tiles to smaller cards
    import torch

    from kernels.fused_moe import choose_tiles, gated_pass_shared_bytes

    moe = [r["shared"] for r in results
           if r["kernel"] == "_fused_moe_kernel" and "bf" in r["dtype"]]  # fmt: skip
    prefill = choose_tiles(256 * 2, 8, torch.bfloat16)
    assert max(moe) == gated_pass_shared_bytes(prefill, torch.bfloat16) == 147_456, moe
    # the int4 tensor-core kernel: 16-bit x fits a 99 KiB card at every tile (fp32 x steps
    # down at launch); at 16-32 rows its unpacked weights go from the pipelined words
    # straight into the mma operand (no store of the tile to shared memory: 1.1-1.5x; the
    # 64-row wgmma takes its operand from shared memory, and beat two 32-row dots)
    mma = [r for r in results if r["kernel"] == "_w4a16_mma_kernel"]
    assert {(r["block_m"], r["group_tiles"]) for r in mma} == {
        (16, True), (16, False), (32, True), (32, False), (64, True)}, mma  # fmt: skip
    for r in mma:
        if r["dtype"] != "torch.float32":
            assert r["shared"] <= 98_304, r
            if r["group_tiles"] and r["block_m"] <= 32:
                assert r["smem_stores"] == 0, r


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    print(json.dumps(_compile_all()))
