"""Does memory-bound decode work run for free beside a compute-bound prefill GEMM?

W1 8B is the sum of its parts (benchmarks/RESULTS.md): prefill GEMMs at the card's power cap
(~3.0 s) and decode steps whose attention reads the KV cache at ~98% of copy bandwidth
(~1.5 s). An engine that ran the decode of finished prompts while later prompts prefill (two
streams, or SMs split between them) would gain only if the card runs both at once. This
measures that before building it (CUDA only):

    python benchmarks/overlap_probe.py [--seconds 0.25] [--sms 16,32,48] [--out x.json]

A (compute): the 8B gate_up projection of a 4096-token prefill chunk (cuBLAS).
B (memory), each in turn: ``attn`` the engine's decode attention at W1's 8B shapes (256 rows,
contexts 64-1280, rotary + KV write, longest first); ``gemm256`` / ``gemm64`` the 8B gate_up
at 256 / 64 decode rows, weights alternating between copies that never stay in L2; ``read``
a 1 GiB read-only stream (``attn-N-W-S``: the attention with other tiles).
B is a CUDA graph of several calls, A four eager calls (a green context's stream takes
them), each repeated so it runs ~``seconds`` alone; then A and B run at once on two streams,
in these modes: ``streams`` (two plain streams), ``priority`` (B's stream at high priority),
``green-N`` (A on a green context of all SMs but N, B on a plain stream). overlap = (t_A +
t_B - t_both) / min(t_A, t_B) with t_A on all SMs (the `streams` case): 1 when B runs for
free, 0 when the two run one after the other, below 0 when together is slower.
"""

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from kernel_bench import BLOCK_SIZE, DEVICE, DTYPE, HEAD_DIM, HIDDEN, KVPool  # noqa: E402
from kernels_w1 import w1_decode_step  # noqa: E402

INTERMEDIATE = 14336
GREEN_CONTEXTS = []  # each must outlive its stream


def gemm(rows: int, copies: int) -> Callable[[], None]:
    """x[rows, 4096] @ gate_up^T into a fixed output; ``copies`` weights in turn."""
    x = torch.randn(rows, HIDDEN, dtype=DTYPE, device=DEVICE)
    ws = [torch.randn(2 * INTERMEDIATE, HIDDEN, dtype=DTYPE, device=DEVICE) for _ in range(copies)]
    y = torch.empty(rows, 2 * INTERMEDIATE, dtype=DTYPE, device=DEVICE)

    def run() -> None:
        for w in ws:
            torch.mm(x, w.t(), out=y)

    return run


def decode_attention(tiles: dict[str, int]) -> Callable[[], None]:
    """The engine's decode kernel over W1's 256-row step (benchmarks/kernels_w1.py's);
    ``tiles``: block_n / num_warps / num_stages other than the launcher's choice."""
    from kernels.paged_attention import paged_attention_decode

    step = w1_decode_step(KVPool(256 * 1280 // BLOCK_SIZE), torch.Generator().manual_seed(1))
    out = torch.empty_like(step.q)

    def run() -> None:
        paged_attention_decode(step.q, step.k_cache, step.v_cache, step.tables, step.seq_lens,
                               HEAD_DIM**-0.5, out=out, new_tokens=step.new, order=step.order,
                               **tiles)  # fmt: skip

    return run


def read_gib() -> Callable[[], None]:
    """A read-only stream through the SMs (a copy in a CUDA graph goes to the copy engines,
    ~2.7 TB/s here)."""
    src = torch.empty(1 << 29, dtype=DTYPE, device=DEVICE).normal_()
    out = torch.empty((), dtype=torch.float32, device=DEVICE)
    return lambda: torch.sum(src, 0, dtype=torch.float32, out=out)


def side(spec: str) -> tuple[Callable[[], None], int]:
    """A B side and its calls per graph: attn, attn-N-W-S (block_n, warps, stages), gemm256,
    gemm64, read."""
    name, *tiles = spec.split("-")
    if name == "attn":
        keys = ("block_n", "num_warps", "num_stages")
        return decode_attention(dict(zip(keys, map(int, tiles), strict=True)) if tiles else {}), 32
    return {"gemm256": lambda: (gemm(256, 2), 16), "gemm64": lambda: (gemm(64, 2), 16),
            "read": lambda: (read_gib(), 4)}[spec]()  # fmt: skip


def graph_of(fn: Callable[[], None], calls: int) -> torch.cuda.CUDAGraph:
    fn()  # compile / pick algorithms outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    # NOTE: the graph replays raw addresses: the tensors fn holds must live as long as it
    # (without this, sides built later reused their memory: illegal addresses, garbage reads)
    graph.inputs = fn
    return graph


def replay(parts: list[tuple[Callable[[], None], int, torch.cuda.Stream]]) -> float:
    """Milliseconds from a common start until every (work, repeats, stream) is done."""
    torch.cuda.synchronize()
    here = torch.cuda.current_stream()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(here)
    for work, n, stream in parts:
        stream.wait_event(start)
        with torch.cuda.stream(stream):
            for _ in range(n):
                work()
    for _, _, stream in parts:
        here.wait_stream(stream)
    end.record(here)
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def green_stream(keep_free: int) -> torch.cuda.Stream:
    """A stream of a green context holding all SMs but ``keep_free``."""
    from torch.cuda.green_contexts import GreenContext

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    ctx = GreenContext.create(num_sms=sms - keep_free, device_id=0)
    GREEN_CONTEXTS.append(ctx)
    if hasattr(ctx, "Stream"):
        return ctx.Stream()
    ctx.set_context()
    try:
        return torch.cuda.Stream()
    finally:
        ctx.pop_context()


def power_summary(smi_csv: Path, probe_json: Path, settle: float = 1.0) -> None:
    """Median power and SM clock of each case's phases (A alone, B alone, both) from an
    ``nvidia-smi --query-gpu=timestamp,power.draw,clocks.sm`` log; the first ``settle`` s of
    a phase is dropped (power.draw is a one-second average)."""
    import datetime

    samples = []
    for line in smi_csv.read_text().splitlines():
        stamp, watts, mhz = (f.strip().split()[0] if i else f.strip()
                             for i, f in enumerate(line.split(",")[:3]))  # fmt: skip
        when = datetime.datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f")
        when = when.replace(tzinfo=datetime.timezone.utc).timestamp()
        samples.append((when, float(watts), float(mhz)))
    for b, mode, *edges in json.loads(probe_json.read_text())["marks"]:
        cells = []
        for phase, lo, hi in zip(("A", "B", "both"), edges, edges[1:], strict=False):
            got = [x for x in samples if lo + settle <= x[0] < hi]
            if got:
                watts, mhz = (statistics.median(x[i] for x in got) for i in (1, 2))
                cells.append(f"{phase} {watts:4.0f} W {mhz:5.0f} MHz")
            else:
                cells.append(f"{phase} (shorter than {settle} s)")
        print(f"{b:8} {mode:9} " + "  ".join(cells))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=0.25, help="each side's time alone")
    p.add_argument("--sms", default="16,32,48", help="SMs left free of A in the green modes")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sides", default="attn,gemm256,gemm64", help="B sides (see side())")
    p.add_argument("--plain", action="store_true", help="two plain streams only")
    p.add_argument("--out", type=Path)
    p.add_argument("--power", type=Path, nargs=2, metavar=("SMI_CSV", "PROBE_JSON"),
                   help="only summarise a run's power log (see power_summary)")  # fmt: skip
    args = p.parse_args()
    if args.power:
        power_summary(*args.power)
        return 0
    props = torch.cuda.get_device_properties(0)
    chunk = gemm(4096, 1)

    def prefill() -> None:
        for _ in range(4):
            chunk()

    sides = {b: graph_of(*side(b)).replay for b in args.sides.split(",")}
    plain, other = torch.cuda.Stream(), torch.cuda.Stream()
    high = torch.cuda.Stream(priority=torch.cuda.Stream.priority_range()[1])
    modes: dict[str, tuple[torch.cuda.Stream, torch.cuda.Stream]] = {
        "streams": (plain, other), "priority": (plain, high)}  # fmt: skip
    if args.plain:
        del modes["priority"]
    for n in () if args.plain else (int(s) for s in args.sms.split(",") if s):
        try:
            modes[f"green-{n}"] = (green_stream(n), other)
        except Exception as exc:  # noqa: BLE001 - report what this torch / driver lacks
            print(f"green-{n}: unavailable ({type(exc).__name__}: {exc})")
    replay([(prefill, 1, plain)])  # cuBLAS's first call picks its algorithm
    one = {}
    for name, work in [("A", prefill), *sides.items()]:
        print(f"timing {name} alone", flush=True)
        one[name] = replay([(work, 3, plain)]) / 3
    counts = {name: max(1, round(args.seconds * 1e3 / ms)) for name, ms in one.items()}
    cases, marks, a_all_sms = [], [], None
    for b, graph in sides.items():
        for mode, (sa, sb) in modes.items():
            runs = []
            try:
                replay([(prefill, 1, sa)])
            except Exception as exc:  # noqa: BLE001 - a green stream this torch cannot use
                print(f"{b} {mode}: failed ({type(exc).__name__}: {exc})")
                continue
            for _ in range(args.repeats):
                t0 = time.time()
                t_a = replay([(prefill, counts["A"], sa)])
                t_mid = time.time()
                t_b = replay([(graph, counts[b], sb)])
                t1 = time.time()
                both = replay([(prefill, counts["A"], sa), (graph, counts[b], sb)])
                marks.append((b, mode, t0, t_mid, t1, time.time()))
                runs.append((t_a, t_b, both))
            t_a, t_b, both = (statistics.median(r[i] for r in runs) for i in range(3))
            a_all_sms = t_a if mode == "streams" else a_all_sms  # the first mode
            overlap = (a_all_sms + t_b - both) / min(a_all_sms, t_b)
            cases.append({"b": b, "mode": mode, "a_ms": t_a, "b_ms": t_b, "both_ms": both,
                          "overlap": overlap, "runs": runs})  # fmt: skip
            print(f"{b:8} {mode:9} A {t_a:7.1f} ms  B {t_b:7.1f} ms  both {both:7.1f} ms"
                  f"  (serial {a_all_sms + t_b:7.1f})  overlap {overlap:5.2f}")  # fmt: skip
    if args.out:
        meta = {"card": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
                "one_ms": one, "counts": counts}  # fmt: skip
        args.out.write_text(json.dumps({"meta": meta, "cases": cases, "marks": marks}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
