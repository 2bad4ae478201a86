"""Request priorities on the tiny Llama: under scheduling_policy="priority", with one sequence
at a time, requests finish in (priority, arrival) order (also from an AsyncLLM whose engine
runs in a process of its own); greedy outputs do not depend on priorities; under "fcfs" a
non-zero priority is refused, and a bad priority is refused naming it, before any request
of the batch is added."""

import asyncio

import numpy as np
import pytest
from engine_testing import GREEDY, make_llm, prompts

from vllm_runner import AsyncLLM, SamplingParams

SHORT = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)


def finish_order(engine) -> list[str]:
    order = []
    while engine.has_unfinished():
        engine.step()
        order += [state.request_id for state in engine.pop_finished()]
    return order


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlapped"])
def test_one_at_a_time_requests_finish_in_priority_then_arrival_order(llama_dir, overlap):
    llm = make_llm(
        llama_dir, scheduling_policy="priority", max_num_seqs=1, async_scheduling=overlap
    )
    for rid, prompt, priority in zip("abcde", prompts(5, seed=31), [3, -2, 0, -2, 0], strict=True):
        llm.engine.add_request(prompt, SHORT, rid, priority=priority)
    assert finish_order(llm.engine) == ["b", "d", "c", "e", "a"]


def test_fcfs_runs_in_arrival_order_and_refuses_a_priority(llama_dir):
    engine = make_llm(llama_dir, max_num_seqs=1).engine
    for rid, prompt in zip("abc", prompts(3, seed=31), strict=True):
        engine.add_request(prompt, SHORT, rid, priority=0)
    with pytest.raises(ValueError, match=r"priority must be 0 unless scheduling_policy is "
                       r"'priority' \(priority scheduling is not enabled: this engine's is "
                       r"'fcfs'\), got -1"):  # fmt: skip
        engine.add_request([1, 2, 3], SHORT, "d", priority=-1)
    assert "d" not in engine.states
    assert finish_order(engine) == ["a", "b", "c"]


def test_greedy_outputs_do_not_depend_on_priorities(llama_dir):
    """Four at a time in a cache too small for them: preemptions (of the least urgent)
    happen, and every request's tokens are those it gets under fcfs."""
    batch = prompts(8, seed=32)
    want = [o.token_ids for o in make_llm(llama_dir).generate(batch, GREEDY)]
    llm = make_llm(llama_dir, scheduling_policy="priority", max_num_seqs=4, num_kv_blocks=12)
    outs = llm.generate(batch, GREEDY, priority=[2, -1, 0, 5, -1, 0, 3, 1])
    assert [o.token_ids for o in outs] == want  # (in prompt order, whatever ran first)
    assert llm.stats()["num_preemptions"] > 0


@pytest.mark.parametrize(
    ("priority", "message"),
    [
        ([0], "got 1 priorities for 2 prompts"),
        ([0, 0, 0], "got 3 priorities for 2 prompts"),
        (1, "priority must be a list of integers, one per prompt, got 1"),
        ("01", "priority must be a list of integers, one per prompt, got '01'"),
        ([0, True], "priority must be an integer, got True"),
        ([0, 1.0], "priority must be an integer, got 1.0"),
        ([0, "1"], "priority must be an integer, got '1'"),
        ([0, None], "priority must be an integer, got None"),
        ([2**63, 0], r"priority must be in \[-2\*\*63, 2\*\*63 - 1\], got 9223372036854775808"),
        ([0, -(2**63) - 1], r"priority must be in \[-2\*\*63, 2\*\*63 - 1\], got -922337"),
    ],
)
def test_bad_priorities_are_refused_before_any_request_is_added(llama_dir, priority, message):
    llm = make_llm(llama_dir, scheduling_policy="priority")
    with pytest.raises(ValueError, match=message):
        llm.generate(prompts(2, seed=33), SHORT, priority=priority)
    assert not llm.engine.has_unfinished() and not llm.engine.states


def test_priorities_at_the_int64_limits_and_numpy_integers_are_taken(llama_dir):
    llm = make_llm(llama_dir, scheduling_policy="priority")
    batch = prompts(3, seed=34)
    outs = llm.generate(batch, SHORT, priority=[-(2**63), 2**63 - 1, np.int64(7)])
    assert [o.token_ids for o in outs] == [o.token_ids for o in llm.generate(batch, SHORT)]


def test_fcfs_refuses_a_non_zero_priority_in_a_batch_before_adding_any(llama_dir):
    llm = make_llm(llama_dir)
    with pytest.raises(ValueError, match="priority must be 0 unless .* got 4"):
        llm.generate(prompts(2, seed=35), SHORT, priority=[0, 4])
    assert not llm.engine.has_unfinished() and not llm.engine.states
    assert len(llm.generate(prompts(2, seed=35), SHORT, priority=[0, 0])) == 2


def test_async_llm_under_fcfs_refuses_a_priority_in_the_caller(tiny_async):
    async def main():
        with pytest.raises(ValueError, match="priority must be 0 unless .* got 2"):
            async for _ in tiny_async.stream([1, 2, 3], SHORT, priority=2):
                pass
        with pytest.raises(ValueError, match="priority must be an integer, got False"):
            async for _ in tiny_async.stream([1, 2, 3], SHORT, priority=False):
                pass
        with pytest.raises(ValueError, match="got 2 priorities for 1 prompts"):
            await tiny_async.generate([[1, 2, 3]], SHORT, priority=[0, 0])
        return await tiny_async.generate([[1, 2, 3]], SHORT, priority=[0])

    assert asyncio.run(main())[0].finished
    assert tiny_async.stats()["num_running"] == 0 and tiny_async.stats()["num_waiting"] == 0


def test_priorities_cross_to_an_engine_process(llama_dir):
    """One seat, held by a long request until the engine process has the four others
    waiting (its stats say so); they then run in (priority, arrival) order, not in the
    order they were sent."""
    llm = AsyncLLM(
        llama_dir, engine_process=True, scheduling_policy="priority", max_num_seqs=1,
        dtype="float32", device="cpu", cpu_kv_cache_gb=0.05,
    )  # fmt: skip
    finished: list[str] = []

    async def run(name: str, priority: int) -> None:
        async for _ in llm.stream([4, 5, 6], SHORT, request_id=name, priority=priority):
            pass
        finished.append(name)

    async def main() -> list[str]:
        try:
            long = SamplingParams(max_tokens=400, ignore_eos=True)
            blocker = llm.stream([1, 2, 3], long, request_id="blocker", priority=-5)
            await anext(blocker)  # it runs: the seat is taken
            order = [("a", 3), ("b", 1), ("c", 2), ("d", 1)]
            tasks = [asyncio.create_task(run(name, priority)) for name, priority in order]
            async for out in blocker:
                assert not out.finished, "the blocker ended before the others were queued"
                if llm.stats()["num_waiting"] == len(order):
                    break
            await blocker.aclose()  # (aborted: the seat is free)
            await asyncio.gather(*tasks)
            return finished
        finally:
            await llm.shutdown()

    assert asyncio.run(asyncio.wait_for(main(), 120)) == ["b", "d", "c", "a"]  # (a hang guard)
