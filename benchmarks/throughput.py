"""Offline throughput: this engine vs HF transformers on the same weights, in one process.

CPU (default model SmolLM2-135M-Instruct, fp32): 32 text prompts, max_tokens ~ U[16, 128]:
    python benchmarks/throughput.py --device cpu [--repeats 3]
GPU (workload W1, random-weight Llama-3.2-1B / Llama-3-8B shapes, bf16): 256 prompts of
64-1024 random token ids, 256 new tokens each; engine vs HF generate (padded batches of 64)
vs HF continuous batching (generate_batch), plus engine batch-1 decode vs bandwidth roofline:
    python benchmarks/throughput.py --device cuda --models 1b,8b --out results.json
Smoke test: add --quick (tiny sizes; on CPU `--models tiny --quick` exercises the W1 path).

All systems ignore EOS; "output tokens" counts the tokens each system returned, at most each
prompt's own max_tokens (HF padded batches generate up to the batch maximum; the extra tokens
are not counted; tokens a system did not return are not credited, and its note says so).
Roofline convention: roofline tok/s = copy bandwidth / weight bytes one decode step reads
(every weight once, except an untied embedding table, of which it reads one row a token:
not counted), where copy bandwidth counts bytes read + bytes written of a large
device-to-device copy.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
sys.path.append(str(Path(__file__).resolve().parent))  # workloads.py, after the repo root

# quant_offload.py imports some of these from here.
from workloads import (  # noqa: E402
    LLAMA_SHAPES,
    Workload,
    build_random_llama,
    copy_bandwidth,
    free_memory,
    random_workload,
    text_workload,
    timed,
    weight_numel,
)


@dataclasses.dataclass
class Result:
    system: str
    model: str
    num_prompts: int
    output_tokens: int
    walls_s: list[float]
    tok_s: float = 0.0
    ratio_vs_hf: float | None = None
    note: str = ""


def run_engine(model_dir: str, wl: Workload, warm: Workload, args, b1: Workload | None):
    from vllm_runner import LLM, SamplingParams

    max_len = max(
        len(p) + m
        for p, m in zip(
            wl.prompts + (b1.prompts if b1 else []),
            wl.max_tokens + (b1.max_tokens if b1 else []),
            strict=True,
        )
    )
    llm = LLM(
        model=model_dir,
        dtype=args.dtype,
        device=args.device,
        max_model_len=max_len,
        seed=args.seed,
        enforce_eager=args.enforce_eager,
        kv_cache_dtype=args.kv_cache_dtype,
        **({"async_scheduling": False} if args.sync_steps else {}),
    )

    cached = [0]

    def gen(w: Workload) -> list[list[int]]:
        params = [
            SamplingParams(
                max_tokens=m,
                ignore_eos=True,
                logprobs=args.logprobs,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=args.top_k,
            )
            for m in w.max_tokens
        ]
        outs = llm.generate(w.prompts, params)
        cached[0] = sum(getattr(o, "num_cached_tokens", 0) for o in outs)
        return [list(o.token_ids) for o in outs]

    gen(warm)
    walls, outs = timed(gen, wl, args.device, args.repeats)
    note = f"prefix-cache hits {cached[0]} tokens (last run)"
    batch1 = None
    if b1 is not None:  # decode tok/s = (n - 1) / (t(n tokens) - t(1 token)): prefill removed
        one = Workload(b1.prompts, [1], b1.vocab)
        t_n = statistics.median(timed(gen, b1, args.device, args.repeats)[0])
        t_1 = statistics.median(timed(gen, one, args.device, args.repeats, salt=1000)[0])
        batch1 = (b1.max_tokens[0] - 1) / max(t_n - t_1, 1e-9)
    return walls, outs, batch1, note


def load_hf(model_dir: str, args):
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, args.dtype)  # the engine's: the same weights (float16 too)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(args.device).eval()


@torch.no_grad()
def hf_generate(model, w: Workload, batch_size: int, device: str) -> list[list[int]]:
    from transformers import GenerationConfig

    outs = []
    for s in range(0, len(w.prompts), batch_size):
        prompts, max_toks = w.prompts[s : s + batch_size], w.max_tokens[s : s + batch_size]
        width = max(map(len, prompts))
        ids = torch.zeros(len(prompts), width, dtype=torch.long)  # [batch, width], left-padded
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        # NOTE: eos_token_id=-1 never matches, so no row stops early (None would fall back to
        # the model's own eos).
        cfg = GenerationConfig(
            max_new_tokens=max(max_toks), do_sample=False, eos_token_id=-1, pad_token_id=0
        )
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=cfg
        )
        outs += [out[i, width : width + m].tolist() for i, m in enumerate(max_toks)]
    return outs


def run_hf(model_dir: str, wl: Workload, warm: Workload, args):
    model = load_hf(model_dir, args)
    bs = args.hf_batch_size or len(wl.prompts)
    hf_generate(model, warm, bs, args.device)
    walls, outs = timed(
        lambda w: hf_generate(model, w, bs, args.device), wl, args.device, args.repeats
    )
    return walls, outs, None, f"padded batches of {bs}"


def run_hf_cb(model_dir: str, wl: Workload, warm: Workload, args):
    from transformers import GenerationConfig

    model = load_hf(model_dir, args)
    extra = {"progress_bar": False}
    extra = {
        k: v for k, v in extra.items() if k in inspect.signature(model.generate_batch).parameters
    }

    @torch.no_grad()  # NOTE: not inference_mode(): generate_batch fails under it
    def gen(w: Workload) -> list[list[int]]:
        # NOTE: one max_new_tokens for every request (generate_batch takes no per-request
        # one): fair for W1, where each asks 256; mixed lengths would handicap HF here
        cfg = GenerationConfig(max_new_tokens=max(w.max_tokens), do_sample=False, eos_token_id=-1)
        res = model.generate_batch(inputs=w.prompts, generation_config=cfg, **extra)
        return [
            list(r.generated_tokens)[:m] for r, m in zip(res.values(), w.max_tokens, strict=True)
        ]

    gen(warm)
    walls, outs = timed(gen, wl, args.device, args.repeats)
    return walls, outs, None, "generate_batch, defaults"


SYSTEMS = {"engine": run_engine, "hf": run_hf, "hf_cb": run_hf_cb}


def agreement(a: list[list[int]], b: list[list[int]], n: int = 16) -> float:
    return sum(x[:n] == y[:n] for x, y in zip(a, b, strict=True)) / max(len(a), 1)


def returned_tokens(outs: list[list[int]], wl: Workload, note: str) -> tuple[int, str]:
    """Output tokens a system returned (the last run), at most each prompt's own max_tokens,
    and its note with what fell short: generate_batch logs a failed request and returns it."""
    pairs = list(zip(outs, wl.max_tokens, strict=True))
    tokens = sum(min(len(o), m) for o, m in pairs)
    bad = sum(len(o) != m for o, m in pairs)
    if tokens < wl.useful_tokens:
        note += f"; {wl.useful_tokens - tokens} of {wl.useful_tokens} requested tokens not returned"
    return tokens, note + (f"; {bad} prompts with wrong output length" if bad else "")


def bench_model(name: str, args, report: dict) -> list[Result]:
    quick = args.quick
    if name == "smollm2":
        from vllm_runner.model.default_model import default_model_path

        model_dir = default_model_path()
        n = args.num_prompts or (4 if quick else 32)
        wl = text_workload(model_dir, n, 4 if quick else 16, 16 if quick else 128, args.seed)
        b1_new, vocab = (16 if quick else 64), 49152
    else:
        shape = "tiny" if quick else name
        model_dir = build_random_llama(shape, Path(args.model_root), args.device, args.seed)
        n = args.num_prompts or (8 if quick else 256)
        lo, hi, new = (16, 64, 16) if quick else (64, 1024, 256)
        vocab = LLAMA_SHAPES[shape][5]
        wl = random_workload(n, vocab, lo, hi, new, args.seed)
        b1_new = new
    warm = random_workload(min(4, n), vocab, 8, 32, 8, args.seed + 1)
    b1 = random_workload(1, vocab, 128, 128, b1_new, args.seed + 2)
    weight_bytes = weight_numel(model_dir) * getattr(torch, args.dtype).itemsize
    results, outs = [], {}
    for system in args.systems:
        print(f"[{name}] {system}: {n} prompts, {wl.useful_tokens} output tokens ...", flush=True)
        fn = SYSTEMS[system]
        walls, o, batch1, note = (
            fn(model_dir, wl, warm, args, b1)
            if system == "engine"
            else fn(model_dir, wl, warm, args)
        )
        free_memory()  # the system's model / engine went out of scope with its runner
        note += f"; load avg {os.getloadavg()[0]:.1f}" if args.device == "cpu" else ""
        outs[system] = o
        tokens, note = returned_tokens(o, wl, note)
        r = Result(system, name, n, tokens, walls, note=note)
        r.tok_s = tokens / statistics.median(walls)
        results.append(r)
        print(f"  median wall {statistics.median(walls):.2f} s -> {r.tok_s:,.1f} tok/s", flush=True)
        print(f"  {note}", flush=True)
        if batch1 is not None:
            roof = report["copy_bandwidth_GBps"] * 1e9 / weight_bytes
            report["batch1"].append(
                {
                    "model": name,
                    "engine_decode_tok_s": batch1,
                    "roofline_tok_s": roof,
                    "weight_bytes": weight_bytes,
                    "fraction_of_roofline": batch1 / roof,
                }
            )
            print(f"  batch-1 decode {batch1:,.1f} tok/s; roofline {roof:,.1f} tok/s", flush=True)
    hf = next((r for r in results if r.system == "hf"), None)
    for r in results:
        r.ratio_vs_hf = r.tok_s / hf.tok_s if hf else None
    if "engine" in outs and "hf" in outs:
        report["greedy_agreement_first16"][name] = agreement(outs["engine"], outs["hf"])
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--models", default=None, help="smollm2 | 1b,8b | tiny (default by device)")
    p.add_argument("--systems", default=None, help="engine,hf,hf_cb (cpu default: engine,hf)")
    p.add_argument("--num-prompts", type=int, default=None)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per system; median kept")
    p.add_argument("--hf-batch-size", type=int, default=None, help="cpu: all; cuda: 64")
    p.add_argument("--dtype", default=None, help="float32 (cpu default) | bfloat16 (cuda)")
    p.add_argument("--model-root", default=str(Path(tempfile.gettempdir()) / "vllm_runner_bench"))
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--kv-cache-dtype", default="auto", help="engine: auto | fp8 (opt-in)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logprobs", type=int, default=None, help="engine: each request asks N")
    p.add_argument("--temperature", type=float, default=0.0, help="engine: 0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="engine: with --temperature")
    p.add_argument("--top-k", type=int, default=-1, help="engine: with --temperature")
    p.add_argument("--sync-steps", action="store_true", help="engine: async_scheduling off")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test")
    p.add_argument("--out", default=None, help="write JSON results here")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.models = (args.models or ("1b,8b" if cuda else "smollm2")).split(",")
    args.systems = (args.systems or ("engine,hf,hf_cb" if cuda else "engine,hf")).split(",")
    unknown = [s for s in args.systems if s not in SYSTEMS]
    bad_models = [m for m in args.models if m != "smollm2" and m not in LLAMA_SHAPES]
    if unknown or bad_models:
        p.error(f"unknown systems {unknown} / models {bad_models}")
    for flag, value in [("--repeats", args.repeats), ("--num-prompts", args.num_prompts)]:
        if value is not None and value < 1:
            p.error(f"{flag} must be >= 1, got {value}")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.hf_batch_size = args.hf_batch_size or (64 if cuda else None)
    return args


def print_table(results: list[Result], report: dict) -> None:
    print(
        f"\n{'system':<8} {'model':<8} {'prompts':>7} {'tokens':>8} {'wall s':>8} "
        f"{'tok/s':>10} {'vs HF':>6}"
    )
    for r in results:
        ratio = f"{r.ratio_vs_hf:.2f}x" if r.ratio_vs_hf else "-"
        print(
            f"{r.system:<8} {r.model:<8} {r.num_prompts:>7} {r.output_tokens:>8} "
            f"{statistics.median(r.walls_s):>8.2f} {r.tok_s:>10,.1f} {ratio:>6}"
        )
    for b in report["batch1"]:
        print(
            f"batch-1 decode {b['model']}: engine {b['engine_decode_tok_s']:,.1f} tok/s, "
            f"roofline {b['roofline_tok_s']:,.1f} tok/s ({b['fraction_of_roofline']:.0%})"
        )
    for m, a in report["greedy_agreement_first16"].items():
        print(f"greedy agreement engine vs HF, first 16 tokens, {m}: {a:.0%}")


def git_commit() -> str:
    """HEAD of this checkout, or $BENCH_COMMIT when set (a copy of the tree whose .git is
    stale, such as the device machine's, should be told the commit it runs)."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    args = parse_args(argv)
    Path(args.model_root).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    card = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    bw = copy_bandwidth(args.device, (1 << 30) if args.device == "cuda" else (256 << 20))
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": git_commit(),
        "card": card,
        "command": " ".join(["python", *sys.argv]),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "copy_bandwidth_GBps": bw / 1e9,
        "batch1": [],
        "greedy_agreement_first16": {},
        "results": [],
    }
    print(f"{card}, copy bandwidth {bw / 1e9:,.1f} GB/s (read + write)", flush=True)
    results = []
    for name in args.models:
        results += bench_model(name, args, report)
    report["results"] = [dataclasses.asdict(r) for r in results]
    print_table(results, report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
