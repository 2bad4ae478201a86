"""Does any cuBLASLt algorithm beat the one ``torch.mm`` runs at W1 8B's 256-row decode GEMMs?
(CUDA only.)

W1 8B's decode GEMMs run at ~550 TFLOP/s against ~690 for the prefill ones: at M = 256 the tile
grid fills the card unevenly (gate_up: 224 tiles of 256 x 128 on 132 SMs). cuBLAS picks one
algorithm by its heuristic; cuBLASLt offers a ranked list of candidates (tile shapes, split-K,
stages, cluster shapes). This times, in CUDA graphs with the weights cycling through copies that
never stay in L2, ``torch.mm`` (cuBLAS; cuBLASLt when torch prefers it; bf16 reductions off) and
every candidate cuBLASLt's heuristic returns, called through ctypes on the library torch loaded.

    python benchmarks/blas_probe.py [--out results.json] [--shapes gate_up,down] [--m 256]
"""

import argparse
import ctypes
import json
import sys
from pathlib import Path

import torch
from gemm_probe import cold_operands

SHAPES = {
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
    "lm_head": (128256, 4096),
}
COMPUTE_32F, R_32F, R_16BF = 68, 0, 14  # cublasComputeType_t, cudaDataType_t
DESC_TRANSA, PREF_MAX_WORKSPACE = 3, 1  # cublasLtMatmulDescAttributes_t, ...PreferenceAttributes_t
CONFIG_ATTRS = {
    "id": 0,
    "tile": 1,
    "splitk": 2,
    "reduction": 3,
    "swizzle": 4,
    "custom": 5,
    "stages": 6,
    "inner": 7,
    "cluster": 8,
}  # cublasLtMatmulAlgoConfigAttributes_t
WORKSPACE = 32 << 20


class Heuristic(ctypes.Structure):
    _fields_ = [
        ("algo", ctypes.c_uint64 * 8),
        ("workspace", ctypes.c_size_t),
        ("state", ctypes.c_int),
        ("waves", ctypes.c_float),
        ("reserved", ctypes.c_int * 4),
    ]


def _load_lt() -> ctypes.CDLL:
    """The cuBLASLt torch has loaded (after one bf16 matmul on the GPU)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "libcublasLt.so" in line:
                return ctypes.CDLL(line.split()[-1])
    raise RuntimeError("libcublasLt is not loaded in this process")


class Lt:
    """out[M, N] = x[M, K] @ w[N, K]^T through cuBLASLt: column-major D[N, M] = W^T(op) X."""

    def __init__(self) -> None:
        self.lib = _load_lt()
        vp, size, i32 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
        self.lib.cublasLtMatmul.argtypes = [vp] * 14 + [size, vp]
        self.lib.cublasLtMatrixLayoutCreate.argtypes = [
            vp,
            i32,
            ctypes.c_uint64,
            ctypes.c_uint64,
            ctypes.c_int64,
        ]
        for fn in ("cublasLtMatmulDescSetAttribute", "cublasLtMatmulPreferenceSetAttribute"):
            getattr(self.lib, fn).argtypes = [vp, i32, vp, size]
        self.lib.cublasLtMatmulAlgoConfigGetAttribute.argtypes = [vp, i32, vp, size, vp]
        self.lib.cublasLtMatmulAlgoGetHeuristic.argtypes = [vp] * 7 + [i32, vp, vp]
        self.handle = ctypes.c_void_p()
        self._ok(self.lib.cublasLtCreate(ctypes.byref(self.handle)), "create")
        self.ws = torch.empty(WORKSPACE, dtype=torch.uint8, device="cuda")
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(0.0)

    @staticmethod
    def _ok(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"cuBLASLt {what}: status {status}")

    def _layout(self, rows: int, cols: int, ld: int) -> ctypes.c_void_p:
        lay = ctypes.c_void_p()
        self._ok(
            self.lib.cublasLtMatrixLayoutCreate(ctypes.byref(lay), R_16BF, rows, cols, ld), "layout"
        )
        return lay

    def plan(self, m: int, n: int, k: int, count: int = 64) -> tuple:
        desc = ctypes.c_void_p()
        self._ok(self.lib.cublasLtMatmulDescCreate(ctypes.byref(desc), COMPUTE_32F, R_32F), "desc")
        trans = ctypes.c_int32(1)
        self._ok(
            self.lib.cublasLtMatmulDescSetAttribute(desc, DESC_TRANSA, ctypes.byref(trans), 4),
            "transa",
        )
        a, b, d = self._layout(k, n, k), self._layout(k, m, k), self._layout(n, m, n)
        pref = ctypes.c_void_p()
        self._ok(self.lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "pref")
        size = ctypes.c_uint64(WORKSPACE)
        self._ok(
            self.lib.cublasLtMatmulPreferenceSetAttribute(
                pref, PREF_MAX_WORKSPACE, ctypes.byref(size), 8
            ),
            "ws",
        )
        results = (Heuristic * count)()
        got = ctypes.c_int(0)
        self._ok(
            self.lib.cublasLtMatmulAlgoGetHeuristic(
                self.handle, desc, a, b, d, d, pref, count, results, ctypes.byref(got)
            ),
            "heuristic",
        )
        return desc, a, b, d, [results[i] for i in range(got.value) if results[i].state == 0]

    def config(self, h: Heuristic) -> dict:
        out = {}
        for name, attr in CONFIG_ATTRS.items():
            need = ctypes.c_size_t(0)
            self.lib.cublasLtMatmulAlgoConfigGetAttribute(
                ctypes.byref(h.algo), attr, None, 0, ctypes.byref(need)
            )
            buf = ctypes.c_uint64(0)
            if (
                0 < need.value <= 8
                and self.lib.cublasLtMatmulAlgoConfigGetAttribute(
                    ctypes.byref(h.algo), attr, ctypes.byref(buf), need.value, ctypes.byref(need)
                )
                == 0
            ):
                out[name] = buf.value
        return out

    def run(
        self, plan: tuple, h: Heuristic, x: torch.Tensor, w: torch.Tensor, out: torch.Tensor
    ) -> None:
        desc, a, b, d, _ = plan
        p = ctypes.c_void_p
        self._ok(
            self.lib.cublasLtMatmul(
                self.handle,
                desc,
                ctypes.byref(self.alpha),
                p(w.data_ptr()),
                a,
                p(x.data_ptr()),
                b,
                ctypes.byref(self.beta),
                p(out.data_ptr()),
                d,
                p(out.data_ptr()),
                d,
                ctypes.byref(h.algo),
                p(self.ws.data_ptr()),
                WORKSPACE,
                p(torch.cuda.current_stream().cuda_stream),
            ),
            "matmul",
        )


def probe_shape(lt: Lt, name: str, m: int) -> list[dict]:
    N, K = SHAPES[name]
    x, ws, ref, bench = cold_operands(m, N, K)
    out = torch.empty(m, N, device="cuda", dtype=torch.bfloat16)
    flops = 2 * m * N * K

    def row(kind: str, us: float, **extra) -> dict:
        err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
        tflops = flops / us / 1e6
        print(f"{name:8s} {kind:20s} {us:8.1f} us {tflops:4.0f} TFLOP/s err {err:.0e} {extra}")
        return {
            "shape": name,
            "m": m,
            "kind": kind,
            "us": us,
            "tflops": flops / us / 1e6,
            "rel_err": err,
            **extra,
        }

    rows = []
    for kind, lib, reduced in [
        ("torch.mm", "cublas", True),
        ("torch.mm cublaslt", "cublaslt", True),
        ("torch.mm fp32-reduce", "cublas", False),
    ]:
        torch.backends.cuda.preferred_blas_library(lib)
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = reduced
        us = bench(lambda w: torch.mm(x, w.T, out=out))
        torch.mm(x, ws[0].T, out=out)
        rows.append(row(kind, us))
    torch.backends.cuda.preferred_blas_library("cublas")
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True
    plan = lt.plan(m, N, K)
    for i, h in enumerate(plan[4]):
        try:
            lt.run(plan, h, x, ws[0], out)
            us = bench(lambda w, h=h: lt.run(plan, h, x, w, out))
            lt.run(plan, h, x, ws[0], out)
        except RuntimeError as e:
            print(f"{name:8s} lt[{i}]: {e}", flush=True)
            continue
        rows.append(
            row(f"lt[{i}]", us, waves=round(h.waves, 3), workspace=h.workspace, **lt.config(h))
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path)
    p.add_argument("--shapes", default="gate_up,down,qkv,o,lm_head")
    p.add_argument("--m", default="256", help="comma-separated row counts")
    args = p.parse_args()
    torch.manual_seed(0)
    a = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    torch.mm(a, a)  # loads cuBLAS / cuBLASLt
    lt = Lt()
    rows = [
        r
        for m in map(int, args.m.split(","))
        for name in args.shapes.split(",")
        for r in probe_shape(lt, name, m)
    ]
    if args.out:
        args.out.write_text(
            json.dumps({"card": torch.cuda.get_device_name(), "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    sys.exit(main())
