"""The latencies AsyncLLM observes for its requests (time to first token, end to end) start
when the caller submits the request, not when the engine's loop gets to it."""

import asyncio
import threading
import time

from vllm_runner import AsyncLLM, SamplingParams

STEP_S = 1.0  # each engine step is held this long (margins of STEP_S / 2 for a loaded host)


def test_time_to_first_token_counts_the_wait_for_the_running_step(default_model_dir):
    """A request sent while a step runs waits for that step before the loop adds it: that
    wait is part of its time to first token, as the client sees it."""
    llm = AsyncLLM(model_name=default_model_dir, device="cpu", max_model_len=256,
                   cpu_kv_cache_gb=0.05, log_stats=True, served_model_name="ttft-wait")  # fmt: skip
    stepping = threading.Event()
    step = llm.engine.step

    def slow_step(*args, **kwargs):
        stepping.set()
        time.sleep(STEP_S)
        return step(*args, **kwargs)

    llm.engine.step = slow_step
    observed = []
    record = llm.metrics.record_request
    llm.metrics.record_request = lambda **t: (observed.append(t), record(**t))

    async def main():
        first = SamplingParams(max_tokens=3, ignore_eos=True)
        running = asyncio.create_task(llm.generate([[1, 2, 3]], first))
        await asyncio.to_thread(stepping.wait)  # its first step runs now
        sent = time.monotonic()
        async for _ in llm.stream([4, 5, 6], SamplingParams(max_tokens=1, ignore_eos=True)):
            seen = time.monotonic() - sent
        await running
        await llm.shutdown()
        return seen

    seen = asyncio.run(main())
    late = observed[0]  # (finished first: one token)
    assert seen > 1.5 * STEP_S  # the rest of the running step, then its own
    assert late["ttft_s"] > seen - STEP_S / 2, (late, seen)
    assert late["e2e_s"] > seen - STEP_S / 2, (late, seen)


def test_capacity_gauges_are_set_before_the_first_request(default_model_dir):
    """An engine stepped in a thread of this process publishes its stats itself: /metrics
    shows its KV blocks and memory from the start, not zeros until the first request."""
    from prometheus_client import REGISTRY

    llm = AsyncLLM(model_name=default_model_dir, device="cpu", max_model_len=256,
                   cpu_kv_cache_gb=0.05, log_stats=True, served_model_name="idle-gauges",
                   engine_process=False)  # fmt: skip
    try:
        stats = llm.stats()
        for key, name in (
            ("kv_blocks_total", "kv_blocks_total"),
            ("kv_cache_bytes", "kv_cache_bytes"),
            ("weight_bytes_resident", "weight_bytes_resident"),
        ):
            got = REGISTRY.get_sample_value(f"vllm_runner_{name}", {"model_name": "idle-gauges"})
            assert got == stats[key] > 0, (name, got, stats[key])
    finally:
        asyncio.run(llm.shutdown())
