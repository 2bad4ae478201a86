"""Prefill-sized GEMMs (M = 16384, W1 8B's projections): one cuBLAS call vs the same work split
along N or M, under cuBLAS and cuBLASLt. Sample the card's SM clock and power alongside
(H200: the big GEMMs run at the ~700 W cap, ~1.5 GHz). CUDA only:

    nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu --format=csv \
        -lms 250 > smi.csv & python benchmarks/gemm_split_probe.py; kill %1
"""

import torch
import triton.testing

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
M = 16384


def main() -> None:
    dev = torch.device("cuda")
    for lib in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(lib)
        for name, (N, K) in SHAPES.items():
            ws = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) for _ in range(2)]
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            c = torch.empty(M, N, device=dev, dtype=torch.bfloat16)
            flops = 2 * M * N * K

            def full(w, x=x, c=c):
                torch.mm(x, w.T, out=c)

            def nsplit(w, s, x=x, c=c, N=N):
                n = N // s
                for i in range(s):
                    torch.mm(x, w[i * n : (i + 1) * n].T, out=c[:, i * n : (i + 1) * n])

            def msplit(w, s, x=x, c=c):
                m = M // s
                for i in range(s):
                    torch.mm(x[i * m : (i + 1) * m], w.T, out=c[i * m : (i + 1) * m])

            res = []
            for label, fn in [
                ("full", full),
                ("n/2", lambda w: nsplit(w, 2)),
                ("n/4", lambda w: nsplit(w, 4)),
                ("m/2", lambda w: msplit(w, 2)),
                ("m/4", lambda w: msplit(w, 4)),
            ]:
                if label.startswith("n") and (N // int(label[-1])) % 128:
                    continue
                ms = triton.testing.do_bench_cudagraph(
                    lambda fn=fn, ws=ws: [fn(w) for w in ws], rep=200
                ) / len(ws)
                res.append(f"{label} {ms * 1e3:7.1f}us {flops / ms / 1e9:5.0f}TF")
            print(lib, name, " | ".join(res), flush=True)


if __name__ == "__main__":
    main()
