"""AsyncLLM: one persistent loop fed by concurrent callers; streaming, abort, isolation."""

import asyncio
import dataclasses

import pytest

from vllm_runner import AsyncLLM, RequestError, SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def smol(default_model_dir):
    llm = AsyncLLM(
        model_name=default_model_dir,
        dtype="float32",
        device="cpu",
        max_model_len=1024,
        cpu_kv_cache_gb=0.25,
    )
    yield llm
    asyncio.run(llm.shutdown())


def run(coro):
    return asyncio.run(coro)


def test_seed_example_runs_as_written(smol, capsys):
    async def main():
        prompts = [
            "Explain the benefits of AI in healthcare.",
            "Write a poem about spring.",
            "Summarize the latest AI research trends.",
        ]
        results = await smol.generate(prompts)
        for i, completion in enumerate(results):
            print(f"Prompt {i + 1}: {prompts[i]}")
            print(f"Completion: {completion}")
        return results

    results = run(main())
    printed = capsys.readouterr().out
    assert len(results) == 3
    for r in results:
        assert str(r) == r.text and f"Completion: {r.text}\n" in printed
        assert r.finish_reason in ("stop", "length") and r.token_ids
    assert any(r.text for r in results)


def test_a_consumer_that_falls_behind_gets_the_waiting_updates_as_one(smol):
    """A busy event loop (a server with many streams) reads its updates late: those waiting
    come merged into one (fewer, larger chunks), with the same text, ids and logprobs."""
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=1)
    prompt = "The capital of France is"

    async def main():
        updates = []
        async for out in smol.stream(prompt, params, request_id="lagging"):
            updates.append(out)
            if len(updates) == 1:  # fall behind until the request's last output is posted
                while smol._entries:  # (the only request in flight)
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0)  # (that hand-over runs before this task resumes)
        final = (await smol.generate([prompt], params))[0]
        return updates, final

    updates, final = run(main())
    assert len(updates) == 2  # the first, then the other 23 tokens as one update
    late = updates[1]
    assert late.finished and late.finish_reason == "length"
    assert len(late.new_token_ids) == len(late.new_logprobs) == 24 - len(updates[0].new_token_ids)
    assert updates[0].new_token_ids + late.new_token_ids == final.token_ids
    assert updates[0].delta + late.delta == late.text == final.text
    assert updates[0].new_logprobs + late.new_logprobs == final.outputs[0].logprobs


def update(index=0, finished=False, error=None, ids=(1,), request_id="r"):
    from vllm_runner.engine.outputs import StreamOutput

    fields = (request_id, index, "x" * len(ids), "", 1, list(ids), None, finished, None, [])
    return StreamOutput(*fields, error=error)


def test_stream_updates_merge_only_within_one_unfinished_completion():
    from vllm_runner.engine.outputs import merge_updates

    updates = [update(ids=(1, 2)), update(ids=(3,)), update(finished=True, ids=(4,))]
    (merged,) = merge_updates(updates)
    assert merged.new_token_ids == [1, 2, 3, 4] and merged.delta == "xxxx" and merged.finished
    assert merged.new_logprobs is None  # none asked for: not an empty list
    final, failure = object(), update(error="failed")
    items = [update(), update(request_id="s"), update(index=1), update(finished=True), update()]
    items += [final, update(), failure]
    assert merge_updates(items) == items  # nothing here continues the update before it
    many = merge_updates([update(ids=(i,)) for i in range(20_000)])  # linear, not quadratic
    assert len(many) == 1 and many[0].new_token_ids == list(range(20_000))
    first = dataclasses.replace(update(), prompt_logprobs=[None, {5: -1.0}], prompt_ranks=[None, 2])
    (merged,) = merge_updates([first, update()])  # a first update's prompt logprobs stay
    assert merged.prompt_logprobs == [None, {5: -1.0}] and merged.prompt_ranks == [None, 2]


def test_the_first_update_carries_the_prompt_logprobs(smol):
    params = SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=1)

    async def main():
        updates = [o async for o in smol.stream("The capital of France is", params)]
        return updates, (await smol.generate(["The capital of France is"], params))[0]

    updates, final = run(main())
    assert updates[0].prompt_logprobs == final.prompt_logprobs
    assert len(final.prompt_logprobs) == len(final.prompt_token_ids)
    assert all(u.prompt_logprobs is None and u.prompt_ranks is None for u in updates[1:])
    ranks = updates[0].prompt_ranks  # (the top 1 listed: a rank 1 token has its entry alone)
    assert ranks[0] is None and len(ranks) == len(final.prompt_token_ids)
    assert [r == 1 for r in ranks[1:]] == [len(e) == 1 for e in final.prompt_logprobs[1:]]


def test_stream_deltas_add_up_to_the_final_text(smol):
    async def main():
        deltas, last = [], None
        async for out in smol.stream("The capital of France is", GREEDY, request_id="r1"):
            deltas.append(out.delta)
            last = out
        final = (await smol.generate(["The capital of France is"], GREEDY))[0]
        return deltas, last, final

    deltas, last, final = run(main())
    assert last.finished and last.finish_reason in ("stop", "length")
    assert "".join(deltas) == last.text == final.text
    assert final.text.startswith(" Paris.")


def test_concurrent_callers_share_the_loop_and_match_sequential(smol):
    prompts = [f"Count from {i} to {i + 5}:" for i in range(8)]

    async def main():
        together = await asyncio.gather(*(smol.generate([p], GREEDY) for p in prompts))
        one_by_one = [await smol.generate([p], GREEDY) for p in prompts]
        return together, one_by_one

    together, one_by_one = run(main())
    assert [r[0].token_ids for r in together] == [r[0].token_ids for r in one_by_one]


def test_abort_and_early_exit_free_blocks(smol):
    async def main():
        long = SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)
        got = []
        async for out in smol.stream("Tell me a long story.", long, request_id="abort-me"):
            got.append(out)
            if len(got) == 3:
                await smol.abort("abort-me")
        gen = smol.stream("Another long story.", long)
        await gen.__anext__()
        await gen.aclose()  # leaving early (a disconnect) aborts too
        for _ in range(100):
            if smol.stats()["kv_blocks_used"] == 0 and smol.stats()["num_running"] == 0:
                break
            await asyncio.sleep(0.05)
        return got

    got = run(main())
    assert got[-1].finished and got[-1].finish_reason == "abort" and len(got) < 10
    assert smol.stats()["kv_blocks_used"] == 0


def test_invalid_request_raises_without_disturbing_others(smol):
    async def main():
        ok = asyncio.create_task(smol.generate(["Hello"], GREEDY))
        with pytest.raises(ValueError, match="max_model_len is 1024"):
            async for _ in smol.stream([1] * 2000, GREEDY):
                pass
        with pytest.raises(ValueError, match="prompt is empty"):
            await smol.generate([""], GREEDY)
        return await ok

    assert run(main())[0].text


def test_a_failing_request_fails_alone(smol, monkeypatch):
    from vllm_runner.engine import detokenizer

    original = detokenizer.IncrementalDetokenizer.add_tokens

    def flaky(self, token_ids, *args):
        if "POISON" in self.tokenizer.decode(self.ids):
            raise RuntimeError("injected detokenizer failure")
        return original(self, token_ids, *args)

    monkeypatch.setattr(detokenizer.IncrementalDetokenizer, "add_tokens", flaky)

    async def main():
        good = asyncio.create_task(smol.generate(["The capital of France is"], GREEDY))
        with pytest.raises(RequestError, match="injected detokenizer failure"):
            await smol.generate(["POISON"], GREEDY)
        return await good

    assert run(main())[0].text.startswith(" Paris.")
    assert smol.stats()["kv_blocks_used"] == 0


def test_a_stream_ended_by_one_failed_completion_aborts_its_siblings(smol, monkeypatch):
    """n = 2 and completion 1 fails: the stream raises, and completion 0 must not go on
    generating unread (it held its blocks and its request id until max_tokens)."""
    from vllm_runner.engine import core

    original = core.apply_step_output

    def failing_second(state, index, out):
        if index == 1:
            raise RuntimeError("injected failure of completion 1")
        return original(state, index, out)

    monkeypatch.setattr(core, "apply_step_output", failing_second)
    params = SamplingParams(n=2, max_tokens=600, ignore_eos=True, seed=1)

    async def main():
        with pytest.raises(RequestError, match="injected failure of completion 1"):
            async for _ in smol.stream("Once upon a time", params, request_id="pair"):
                pass
        monkeypatch.undo()
        # the abort is a command like any other: this request runs after it was applied
        return [o async for o in smol.stream("Hello", GREEDY, request_id="pair")]

    outs = run(main())
    assert outs[-1].finished and outs[-1].num_token_ids == 12
    assert smol.stats()["kv_blocks_used"] == 0 and smol.stats()["num_running"] == 0


def test_serving_engine_asks_for_the_serving_step_budget(default_model_dir, monkeypatch):
    """AsyncLLM (the service) and LLM (offline) pick their default step budgets apart."""
    import vllm_runner.config as config
    from vllm_runner import LLM

    monkeypatch.setattr(config, "default_step_budget", lambda device, serving: 3000 + serving)
    kw = dict(dtype="float32", device="cpu", max_model_len=256, cpu_kv_cache_gb=0.05)
    assert LLM(default_model_dir, **kw).engine.scheduler.config.max_num_batched_tokens == 3000
    online = AsyncLLM(model_name=default_model_dir, **kw)
    try:
        assert online.engine.scheduler.config.max_num_batched_tokens == 3001
    finally:
        run(online.shutdown())


def test_served_model_name_only_names_the_model(default_model_dir):
    """``served_model_name`` (the service's setting) is the id clients use, not a path."""
    online = AsyncLLM(default_model_dir, served_model_name="smol", dtype="float32",
                      device="cpu", max_model_len=256, cpu_kv_cache_gb=0.05)  # fmt: skip
    try:
        assert online.model_name == "smol"
        assert run(online.generate(["Hello"], SamplingParams(max_tokens=2)))[0]
    finally:
        run(online.shutdown())


def test_an_id_reused_after_a_disconnect_gets_its_own_outputs(smol):
    """A stream dropped mid-way and a new one under the same id at once: the old request's
    abort must not end the new stream (outputs were routed by id alone)."""
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

    async def main():
        want = (await smol.generate(["Hello there"], params))[0].outputs[0].token_ids
        first = smol.stream("Once upon a time", SamplingParams(max_tokens=200, ignore_eos=True),
                            request_id="reused")  # fmt: skip
        async for _ in first:
            break
        await first.aclose()
        outs = [o async for o in smol.stream("Hello there", params, request_id="reused")]
        return want, outs

    want, outs = run(main())
    assert outs[-1].finished and outs[-1].finish_reason == "length"
    assert [t for o in outs for t in o.new_token_ids] == want and outs[-1].num_token_ids == 8


def test_inter_token_latency_is_per_completion(monkeypatch):
    """n > 1: siblings' tokens of one step are not an inter-token gap of 0 s (vLLM keeps
    per-child stats); each completion's own gaps are observed."""
    from vllm_runner.engine import output_processor as op
    from vllm_runner.engine.outputs import EngineStepOutput
    from vllm_runner.engine.serving_loop import request_timings

    state = op.new_request_state("r", None, [1, 2], SamplingParams(n=2, max_tokens=3), None, "r")
    now = [0.0]
    monkeypatch.setattr(op.time, "monotonic", lambda: now[0])
    for step, t in enumerate([10.0, 10.5, 11.25]):
        now[0] = t
        for index in (0, 1):  # both siblings each step
            op.apply_step_output(state, index, EngineStepOutput("r", [step], None, None, None))
    assert request_timings(state).itl_s == [0.5, 0.75, 0.5, 0.75]


def test_each_completion_is_counted_under_its_own_finish_reason():
    """n > 1: as vLLM counts its children, each completion counts once in
    request_success under its own reason (only the first one's was counted: a completion cut
    at max_tokens next to one that stopped showed as one "stop")."""
    from vllm_runner.engine import output_processor as op
    from vllm_runner.engine.serving_loop import request_timings

    state = op.new_request_state("r", None, [1, 2], SamplingParams(n=3, max_tokens=3), None, "r")
    for c, reason in zip(state.completions, ["stop", "length", "abort"], strict=True):
        c.finish_reason = reason
    assert request_timings(state).finish_reasons == ["stop", "length", "abort"]


def test_the_engine_is_built_in_the_thread_that_steps_it(default_model_dir, monkeypatch):
    """On the CPU, PyTorch work from two threads runs two OpenMP teams that share the cores
    (a CPU engine loaded in one thread and stepped in another ran 23-40% slower): the loop
    thread builds the engine it steps; a build error is raised in the caller."""
    import threading

    from vllm_runner import async_llm

    built_in, stepped_in = [], []

    class Recording(async_llm.EngineCore):
        def __init__(self, *args, **kwargs):
            built_in.append(threading.current_thread())
            super().__init__(*args, **kwargs)

        def step(self, *args, **kwargs):
            stepped_in.append(threading.current_thread())
            return super().step(*args, **kwargs)

    monkeypatch.setattr(async_llm, "EngineCore", Recording)
    llm = AsyncLLM(model_name=default_model_dir, device="cpu", max_model_len=256,
                   cpu_kv_cache_gb=0.05)  # fmt: skip

    async def main():
        async for _ in llm.stream("Hi", SamplingParams(max_tokens=2)):
            pass
        await llm.shutdown()

    run(main())
    assert built_in == [llm._thread] and set(stepped_in) == {llm._thread}
    with pytest.raises(ValueError, match="max_model_len must be >= 2"):
        AsyncLLM(model_name=default_model_dir, device="cpu", max_model_len=1)


def test_an_interrupted_start_leaves_no_engine_thread_behind(monkeypatch):
    """Ctrl-C while the model loads (the caller waiting for the loop thread): the thread
    ends once its build does, instead of holding the engine forever."""
    import signal
    import threading
    import time

    from vllm_runner import async_llm

    class Engine:  # a loading EngineCore, interrupted by Ctrl-C meanwhile
        def __init__(self, *args, **kwargs):
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            time.sleep(0.2)

    monkeypatch.setattr(async_llm, "EngineCore", Engine)
    monkeypatch.setattr(async_llm, "engine_args", lambda *args, **switches: None)
    # (a process started in the background by a shell without job control inherits SIGINT
    # ignored, and Python then installs no handler: Ctrl-C's KeyboardInterrupt is wanted)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    before = set(threading.enumerate())
    try:
        with pytest.raises(KeyboardInterrupt):
            AsyncLLM("any", engine_process=False)
    finally:
        signal.signal(signal.SIGINT, previous)
    (thread,) = set(threading.enumerate()) - before
    thread.join(timeout=30)
    assert not thread.is_alive()
