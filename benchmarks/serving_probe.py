"""Probe: where a served stream's per-token time goes, without HTTP. One engine, the same
requests (token-id prompts, 256 new tokens, EOS ignored), stepped four ways:

    python benchmarks/serving_probe.py [--model 1b] [--device cuda] [--streams 1,64]

- `LLM.generate` (offline: the main thread steps, no stream outputs);
- the engine stepped by hand in the main thread with stream outputs (`step(stream=True)`);
- the same from another thread (as AsyncLLM's loop runs it);
- `AsyncLLM.stream`, consumed by asyncio tasks: the event loop, and the engine's loop in a
  thread or (`--engine-process 1`) in a process of its own; once per `--switch-intervals`
  value (`sys.setswitchinterval`: how long a thread holding the GIL keeps it while another
  waits; Python's default is 0.005 s). With `--front-ends N` the streams are spread over N
  processes whose AsyncLLMs share one engine process (as N BentoML workers do).

`--closed-loop SECONDS`: instead of one batch of 256-token requests, each stream slot sends
requests of 128 new tokens back to back for that long (distinct prompts of 64-512 ids), as
load-test users do: requests arrive and leave at every step.

`--temperature T` (default 0, greedy): T > 0 samples, as chat requests do by default.

`--variant KEY=VALUE[,KEY=VALUE]` (repeatable): one engine per variant, in turn, with those
EngineArgs (e.g. `--variant piecewise_max_tokens=0 --variant piecewise_max_tokens=2048`);
each run's time to first token (p50 / p99) is printed beside its rate.

`--tokenizer DIR` copies a tokenizer into the random model (its vocabulary size is the
model's), so that outputs are detokenized as a served model's are.

Prints output tok/s of each for each number of concurrent streams, medians of 3.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from workloads import LLAMA_SHAPES, build_random_llama, random_workload  # noqa: E402

from vllm_runner import LLM, AsyncLLM, SamplingParams  # noqa: E402

NEW_TOKENS = 256


def free_device() -> None:
    """Dropped engines' memory back to the driver (an engine process sizes its KV cache
    from what the device has free)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def by_hand(engine, prompts: list[list[int]], params: SamplingParams) -> None:
    for p in prompts:
        engine.add_request(p, params)
    while engine.has_unfinished():
        engine.step(stream=True)
    engine.pop_finished()


def in_thread(fn) -> None:
    thread = threading.Thread(target=fn)
    thread.start()
    thread.join()


LOOP_TOKENS = 128


def front_end(path: str, kw: dict, conn) -> None:
    """A helper process's AsyncLLM on the shared engine: streams each job's prompts."""
    llm = AsyncLLM(path, **kw)
    conn.send("ready")
    while (job := conn.recv()) is not None:
        conn.send(asyncio.run(streamed(llm, *job)))
    asyncio.run(llm.shutdown())


async def streamed(
    llm: AsyncLLM, prompts: list[list[int]], slots: int, seconds: float | None, temperature: float
) -> tuple[int, list[float]]:
    """Each prompt once (256 new tokens), or (``seconds``) ``slots`` streams sending
    128-token requests back to back, taking prompts in turn; returns the tokens streamed
    and each request's seconds to its first token."""
    new = NEW_TOKENS if seconds is None else LOOP_TOKENS
    params = SamplingParams(max_tokens=new, temperature=temperature, ignore_eos=True)
    stop = time.monotonic() + (seconds or 0)

    ttfts: list[float] = []

    async def slot(i: int) -> int:
        tokens = 0
        for p in prompts[i::slots]:
            start, first = time.perf_counter(), True
            async for out in llm.stream(p, params):
                if first and out.new_token_ids:
                    ttfts.append(time.perf_counter() - start)
                    first = False
                tokens += len(out.new_token_ids)
            if time.monotonic() >= stop:
                break
        return tokens

    return sum(await asyncio.gather(*(slot(i) for i in range(slots)))), ttfts


def offline_rates(
    llm: LLM, prompts: list[list[int]], params: SamplingParams, repeats: int
) -> dict[str, float]:
    llm.generate(prompts, params)  # warm-up
    ways = {
        "LLM.generate": lambda: llm.generate(prompts, params),
        "step(stream) main thread": lambda: by_hand(llm.engine, prompts, params),
        "step(stream) other thread": lambda: in_thread(
            lambda: by_hand(llm.engine, prompts, params)
        ),
    }
    tokens = len(prompts) * NEW_TOKENS
    return {
        name: tokens / statistics.median(timed(fn) for _ in range(repeats))
        for name, fn in ways.items()
    }


def engine_args(variant: str) -> dict:
    """``"a=1,b=true"`` -> {"a": 1, "b": True}: ints, floats and booleans as such."""
    out = {}
    for item in filter(None, variant.split(",")):
        key, _, text = item.partition("=")
        value: object = text
        if text.lower() in ("true", "false"):
            value = text.lower() == "true"
        else:
            for kind in (int, float):
                try:
                    value = kind(text)
                    break
                except ValueError:
                    pass
        out[key.strip()] = value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="1b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--streams", default="1,64")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--switch-intervals", default="0.005", help="seconds, comma-separated")
    ap.add_argument("--async-only", action="store_true", help="skip the offline ways")
    ap.add_argument(
        "--engine-process", default="0", help="AsyncLLM placements: 0 thread, 1 process"
    )
    ap.add_argument("--front-ends", type=int, default=1, help="processes sharing the engine")
    ap.add_argument("--closed-loop", type=float, help="seconds of back-to-back requests")
    ap.add_argument("--tokenizer", help="a folder of tokenizer files to serve the model with")
    ap.add_argument(
        "--temperature", type=float, default=0.0, help="0: greedy; > 0: sampled, as chat"
    )
    ap.add_argument(
        "--variant", action="append", help="EngineArgs KEY=VALUE[,KEY=VALUE]: one engine each"
    )
    ap.add_argument("--out")
    args = ap.parse_args()
    vocab_size = None
    if args.tokenizer:
        from vllm_runner.tokenizer import load_tokenizer

        vocab_size = len(load_tokenizer(args.tokenizer))
    root = Path("/tmp/vllm_runner_bench")
    path = build_random_llama(args.model, root, args.device, 0, vocab_size=vocab_size)
    if args.tokenizer:
        for f in Path(args.tokenizer).iterdir():
            shutil.copy(f, path)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=args.temperature, ignore_eos=True)
    kw = dict(device=args.device, dtype="bfloat16" if args.device == "cuda" else "float32")
    kw["max_model_len"] = 2048
    vocab = min(vocab_size or LLAMA_SHAPES[args.model][5], 32000)
    results: dict[str, dict[str, float]] = {}
    ttft_ms: dict[str, dict[str, list[float]]] = {}
    for n in map(int, args.streams.split(",")):
        results[str(n)], ttft_ms[str(n)] = {}, {}
    if not args.async_only:
        llm = LLM(path, **kw)
        for n in map(int, args.streams.split(",")):
            prompts = random_workload(n, vocab, 64, 512, NEW_TOKENS, seed=n).prompts
            results[str(n)] = offline_rates(llm, prompts, params, args.repeats)
        llm = None  # frees the device for the AsyncLLM below
        free_device()
    default_interval = sys.getswitchinterval()

    async def spread(
        async_llm: AsyncLLM, prompts: list[list[int]], slots: int, helpers: list
    ) -> tuple[int, list[float]]:
        k = len(helpers) + 1
        shares = [
            (prompts[i::k], len(range(i, slots, k)), args.closed_loop, args.temperature)
            for i in range(k)
        ]
        for conn, share in zip(helpers, shares[1:], strict=True):
            conn.send(share)
        tokens, ttfts = await streamed(async_llm, *shares[0])
        for conn in helpers:
            theirs, their_ttfts = await asyncio.to_thread(conn.recv)
            tokens += theirs
            ttfts += their_ttfts
        return tokens, ttfts

    async def run_async(async_llm: AsyncLLM, where: str, helpers: list) -> None:
        for n in map(int, args.streams.split(",")):
            pool = n if args.closed_loop is None else 64 * n  # (no prefix-cache hits)
            prompts = random_workload(pool, vocab, 64, 512, NEW_TOKENS, seed=n).prompts
            await spread(async_llm, prompts[:n], n, helpers)  # warm-up
            for interval in map(float, args.switch_intervals.split(",")):
                sys.setswitchinterval(interval)
                rates, ttfts = [], []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    tokens, times = await spread(async_llm, prompts, n, helpers)
                    rates.append(tokens / (time.perf_counter() - start))
                    ttfts += times
                key = f"AsyncLLM.stream {where} switch {interval:g}s"
                results[str(n)][key] = statistics.median(rates)
                q = statistics.quantiles(ttfts, n=100)
                ttft_ms[str(n)][key] = [1000 * q[49], 1000 * q[98]]
                print(f"{n} streams: {key} {results[str(n)][key]:,.0f} tok/s", flush=True)
        sys.setswitchinterval(default_interval)
        await async_llm.shutdown()

    variants = args.variant or [""]
    runs = [
        (k, variant, int(apart))
        for k, variant in enumerate(variants)
        for apart in args.engine_process.split(",")
    ]
    base = dict(kw)
    for k, variant, apart in runs:
        kw = {**base, **engine_args(variant)}
        where = "process" if apart else "thread"
        helpers, shared = [], {}
        if args.front_ends > 1:
            where = f"process shared by {args.front_ends} front ends"
            shared = {"shared_engine": f"serving-probe-{os.getpid()}-{k}-{apart}"}
        if variant:
            where += f", {variant} (run {k})"
        async_llm = AsyncLLM(path, engine_process=bool(apart), **shared, **kw)
        ctx = multiprocessing.get_context("spawn")
        for _ in range(args.front_ends - 1):
            mine, theirs = ctx.Pipe()
            ctx.Process(target=front_end, args=(path, {**kw, **shared}, theirs)).start()
            assert mine.recv() == "ready"
            helpers.append(mine)
        asyncio.run(run_async(async_llm, where, helpers))
        for conn in helpers:
            conn.send(None)
        async_llm = None
        free_device()
    for n, row in results.items():
        for key, rate in row.items():
            ttft = ttft_ms[n].get(key)
            at = f" (TTFT p50 / p99 {ttft[0]:.0f} / {ttft[1]:.0f} ms)" if ttft else ""
            print(f"{n} streams: {key} {rate:,.0f} tok/s{at}")
    if args.out:
        record = {"args": vars(args), "tok_per_s": results, "ttft_ms_p50_p99": ttft_ms}
        Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
