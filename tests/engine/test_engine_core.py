"""EngineCore's own bookkeeping, driven directly: request ids, abort of a partly finished
request, the switch between overlapped and synchronous steps, and what a request reports."""

import time

import pytest
from engine_testing import GREEDY, make_llm, prompts

from vllm_runner import SamplingParams
from vllm_runner.engine import core
from vllm_runner.engine.serving_loop import request_timings


def test_a_request_id_in_use_is_refused_and_the_first_request_runs_on(llama_dir):
    engine = make_llm(llama_dir).engine
    prompt = prompts(1, seed=21)[0]
    first = engine.add_request(prompt, GREEDY, "x")
    with pytest.raises(ValueError, match="request_id 'x' is already in use"):
        engine.add_request([7, 8, 9], GREEDY, "x")
    while engine.has_unfinished():
        engine.step()
    want = make_llm(llama_dir).generate([prompt], GREEDY)[0].token_ids
    assert first.final_output().token_ids == want
    assert engine.states == {} and engine.child_to_state == {}
    assert engine.stats()["kv_blocks_used"] == 0


def test_an_abort_ends_only_the_completions_still_going(llama_dir, monkeypatch):
    """n = 2, completion 1 failed: the abort ends completion 0 alone (one final output) and
    completion 1 keeps its own finish reason."""
    original = core.apply_step_output

    def failing_second(state, index, out):
        if index == 1:
            raise RuntimeError("injected failure of completion 1")
        return original(state, index, out)

    engine = make_llm(llama_dir).engine
    monkeypatch.setattr(core, "apply_step_output", failing_second)
    params = SamplingParams(n=2, max_tokens=8, temperature=0.0, ignore_eos=True)
    state = engine.add_request(prompts(1, seed=22)[0], params, "pair")
    engine.step()
    monkeypatch.undo()
    outs = engine.abort("pair")
    assert [(o.index, o.finish_reason, o.finished) for o in outs] == [(0, "abort", True)]
    assert [c.finish_reason for c in state.completions] == ["abort", "error"]
    assert engine.pop_finished() == [state] and not engine.has_unfinished()


def test_steps_overlap_again_once_a_prompt_logprobs_request_is_done(llama_dir):
    """A request asking for prompt logprobs (0: the prompt tokens' own) makes steps
    synchronous while it lives (finished or aborted); later requests' steps overlap again."""
    llm = make_llm(llama_dir, async_scheduling=True)
    engine = llm.engine
    launch, launches = engine.runner.launch, []
    engine.runner.launch = lambda sched, overlap: launches.append(overlap) or launch(sched, overlap)
    scored = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
    llm.generate(prompts(2, seed=23), scored)
    assert launches and not any(launches)
    engine.add_request([5, 17, 42, 99], scored, "s")
    engine.step()
    engine.abort("s")
    assert engine.num_host_bound == 0
    launches.clear()
    llm.generate(prompts(2, seed=24), GREEDY)
    assert launches and all(launches)


def test_a_prompt_logprobs_request_joining_overlapped_steps_keeps_each_ones_tokens(llama_dir):
    """Steps turn synchronous while a step is in flight: that step is finished first, so
    each request gets its tokens in order (as with synchronous steps throughout)."""
    ps = prompts(2, seed=25)
    plain = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    scored = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, prompt_logprobs=1)
    want = make_llm(llama_dir, async_scheduling=False).generate(ps, [plain, scored])
    engine = make_llm(llama_dir, async_scheduling=True).engine
    first = engine.add_request(ps[0], plain, "a")
    for _ in range(3):
        engine.step()
    assert engine.pending is not None
    second = engine.add_request(ps[1], scored, "b")
    while engine.has_unfinished():
        engine.step()
    assert first.final_output().token_ids == want[0].token_ids
    got = second.final_output()
    assert got.token_ids == want[1].token_ids
    assert len(got.prompt_logprobs) == len(ps[1]) and got.prompt_logprobs[0] is None
    assert engine.stats()["kv_blocks_used"] == 0


def test_a_failed_wait_fails_its_step_and_leaves_nothing_in_flight(llama_dir, monkeypatch):
    """With steps overlapped, reading the last step's results fails: the request fails with
    the tokens of the steps before it, and that step is not waited for again."""
    engine = make_llm(llama_dir, async_scheduling=True).engine
    wait, handles = engine.runner.wait, []

    def failing_third(handle):
        handles.append(handle)
        if len(handles) == 3:
            raise RuntimeError("injected wait failure")
        return wait(handle)

    monkeypatch.setattr(engine.runner, "wait", failing_third)
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    state = engine.add_request(prompts(1, seed=5)[0], params, "x")
    while not state.finished:
        engine.step()
    assert len(state.completions[0].token_ids) == 2
    assert state.completions[0].finish_reason == "error"
    assert engine.pending is None and not engine.has_unfinished()
    monkeypatch.undo()
    again = engine.add_request(prompts(1, seed=5)[0], params, "y")
    while engine.has_unfinished():
        engine.step()
    assert len(again.completions[0].token_ids) == 3
    assert engine.stats()["kv_blocks_used"] == 0


def test_a_requests_cached_tokens_are_its_first_completions(llama_dir):
    """n = 2 on a fresh engine: the prompt was computed, not read from the prefix cache
    (completion 1 reusing completion 0's blocks does not count); run again, it was."""
    llm = make_llm(llama_dir, enable_prefix_caching=True)
    prompt = prompts(1, seed=3)[0] + list(range(1, 40))
    params = SamplingParams(n=2, max_tokens=4, temperature=0.0, ignore_eos=True)
    assert llm.generate([prompt], params)[0].num_cached_tokens == 0
    assert llm.generate([prompt], params)[0].num_cached_tokens == 48  # its 3 full blocks


def test_latencies_count_from_the_arrival_time_the_caller_gives(llama_dir):
    """A front end apart from the engine passes when the request arrived there."""
    engine = make_llm(llama_dir).engine
    arrived = time.monotonic() - 7.25
    state = engine.add_request([5, 17, 42, 99], GREEDY, "x", arrival_time=arrived)
    assert state.arrival_time == arrived
    while engine.has_unfinished():
        engine.step()
    assert request_timings(state).ttft_s == state.first_token_time - arrived
