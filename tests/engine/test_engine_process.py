"""AsyncLLM with its engine core in a process of its own (the default on CUDA): the same
results as the in-thread loop, requests checked in the caller, and a dead engine process
failing its streams instead of leaving them waiting."""

import asyncio
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from vllm_runner import AsyncLLM, SamplingParams
from vllm_runner.async_llm import RequestError
from vllm_runner.engine.outputs import RequestOutput

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
KW = dict(dtype="float32", device="cpu", max_model_len=1024, cpu_kv_cache_gb=0.25)
PROMPTS = ["The capital of France is", "Write a poem about spring.", [1, 2, 3, 4, 5]]


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def apart(default_model_dir):
    llm = AsyncLLM(
        default_model_dir, engine_process=True, log_stats=True, served_model_name="apart", **KW
    )
    yield llm
    run(llm.shutdown())


def test_outputs_equal_the_in_thread_loop(apart, smol_llm):
    """Greedy tokens and texts, streamed deltas, stats and metrics come through the pipe."""
    from prometheus_client import REGISTRY

    def finished():
        labels = {"model_name": "apart", "finished_reason": "length"}
        return REGISTRY.get_sample_value("vllm_runner_request_success_total", labels) or 0

    assert apart.engine is None and apart._client.process.is_alive()
    want = smol_llm.generate(PROMPTS, GREEDY)
    before = finished()

    async def main():
        got = await apart.generate(PROMPTS, GREEDY)
        deltas = [o.delta async for o in apart.stream(PROMPTS[0], GREEDY)]
        return got, deltas

    got, deltas = run(main())
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.text for o in got] == [o.text for o in want]
    assert "".join(deltas) == want[0].text
    stats = apart.stats()
    assert stats["kv_blocks_used"] == 0 and stats["generation_tokens_total"] >= 4 * 12
    assert apart.max_model_len == 1024 and apart.model_name == "apart"
    assert finished() - before == 4  # the requests' timings came with their last step


def test_streamed_updates_are_whole_again_after_the_pipe(apart, smol_llm):
    """Updates cross the pipe as what is new in them; the front end adds back the request
    id, prompt ids and text so far: n = 2, a stop string, logprobs."""
    params = SamplingParams(
        n=2, max_tokens=16, temperature=0.8, seed=7, stop=[" the"], logprobs=1, ignore_eos=True
    )
    prompt = "The capital of France is"
    (want,) = smol_llm.generate([prompt], params)

    async def main():
        return [o async for o in apart.stream(prompt, params, request_id="whole")]

    updates = run(main())
    for index, completion in enumerate(want.outputs):
        mine = [u for u in updates if u.index == index]
        text = ""
        for u in mine:
            text += u.delta
            assert u.text == text and u.request_id == "whole"
            assert u.prompt_token_ids == want.prompt_token_ids
        assert text == completion.text and mine[-1].finish_reason == completion.finish_reason
        assert [t for u in mine for t in u.new_token_ids] == completion.token_ids
        assert mine[-1].num_token_ids == len(completion.token_ids)
        assert [lp for u in mine for lp in u.new_logprobs] == completion.logprobs


def test_prompt_logprobs_come_through_the_pipe(apart, smol_llm):
    params = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=2)
    (want,) = smol_llm.generate(["The capital of France is"], params)

    async def main():
        return [o async for o in apart.stream("The capital of France is", params)]

    first = run(main())[0]
    assert first.prompt_logprobs[0] is None
    assert len(first.prompt_logprobs) == len(want.prompt_logprobs)
    for mine, theirs in zip(first.prompt_logprobs[1:], want.prompt_logprobs[1:], strict=True):
        assert mine.keys() == theirs.keys()
        assert list(mine.values()) == pytest.approx(list(theirs.values()), abs=1e-5)
    # and the prompt tokens' ranks: within the top 2 just when listed among them
    ranks = first.prompt_ranks
    assert ranks[0] is None and len(ranks) == len(first.prompt_logprobs)
    assert [r <= 2 for r in ranks[1:]] == [len(e) == 2 for e in first.prompt_logprobs[1:]]


def test_the_front_end_builds_the_text_of_requests_without_stop_strings(apart, smol_llm):
    """The engine process leaves those requests' text to the front end (it ends a request at
    a stop string, so it keeps the text of those): the same deltas, texts and final outputs
    as the in-thread loop, for n = 2 sampled, a stream that ends at EOS, special tokens kept."""
    cases = [
        ("Once upon a time", SamplingParams(n=2, max_tokens=24, seed=3, ignore_eos=True)),
        ("The capital of France is", SamplingParams(max_tokens=64, temperature=0.0)),
        ([1, 2, 3], SamplingParams(max_tokens=8, temperature=0.0, skip_special_tokens=False)),
    ]
    (probe,) = smol_llm.generate(["Once upon a time"], SamplingParams(max_tokens=6, temperature=0))
    stop_id = probe.outputs[0].token_ids[3]  # (ends the greedy stream at its 4th token)
    for keep in (False, True):
        kept = SamplingParams(
            max_tokens=6, temperature=0.0, stop_token_ids=[stop_id], include_stop_str_in_output=keep
        )
        cases.append(("Once upon a time", kept))
    sent = []
    send = apart._send_command

    def spy(command):
        sent.append(command)
        send(command)

    async def main():
        apart._send_command = spy
        try:
            outs = []
            for prompt, params in cases:
                outs.append([o async for o in apart._run(prompt, params, None, 0)])
            return outs
        finally:
            apart._send_command = send

    got = run(main())
    assert [c[6] for c in sent if c[0] == "add"] == [False] * len(cases)  # (detokenize)
    for (prompt, params), items in zip(cases, got, strict=True):
        (want,) = smol_llm.generate([prompt], params)
        final = items[-1]
        assert isinstance(final, RequestOutput) and final.outputs == want.outputs
        for completion in want.outputs:
            updates = [u for u in items[:-1] if u.index == completion.index]
            assert "".join(u.delta for u in updates) == updates[-1].text == completion.text
            assert [t for u in updates for t in u.new_token_ids] == completion.token_ids
    assert got[1][-1].finish_reason == "stop"  # (EOS: its text left out, as the engine does)
    stopped, kept = got[3][-1].outputs[0], got[4][-1].outputs[0]
    assert stopped.stop_reason == kept.stop_reason == stop_id
    assert len(kept.text) > len(stopped.text) and kept.text.startswith(stopped.text)


def test_a_stop_string_request_is_detokenized_in_the_engine(apart, smol_llm):
    params = SamplingParams(max_tokens=32, temperature=0.0, stop=[" the"])
    with pytest.raises(ValueError, match=r"stop=\[' the'\] needs detokenize=True"):
        smol_llm.engine.add_request("Hello", params, detokenize=False)
    (want,) = smol_llm.generate(["Once upon a time"], params)
    (got,) = run(apart.generate(["Once upon a time"], params))
    assert got.outputs == want.outputs and got.outputs[0].stop_reason == " the"


def test_a_front_end_text_failure_fails_its_request_alone(apart, monkeypatch):
    """Building one request's text fails in the front end: that request fails naming it, the
    engine aborts it (no block kept), and the requests beside it finish."""
    from vllm_runner.engine import detokenizer

    original = detokenizer.IncrementalDetokenizer.add_tokens

    def flaky(self, token_ids, *args):
        if "POISON" in self.tokenizer.decode(self.ids):
            raise RuntimeError("injected front-end detokenizer failure")
        return original(self, token_ids, *args)

    monkeypatch.setattr(detokenizer.IncrementalDetokenizer, "add_tokens", flaky)
    long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)

    async def main():
        good = asyncio.create_task(apart.generate(["The capital of France is"], GREEDY))
        with pytest.raises(RequestError, match="injected front-end detokenizer failure"):
            await apart.generate(["POISON"], long)
        return await good

    assert run(main())[0].text
    run(apart.generate(["Hi"], SamplingParams(max_tokens=2)))  # (the abort applied by then)
    assert apart.stats()["kv_blocks_used"] == 0 and apart.stats()["num_running"] == 0


def test_a_text_failure_after_its_stream_closed_spares_the_id_reused(apart, monkeypatch):
    """A stream closes (its abort sent), then building its next update's text fails while a
    new stream has taken its id: the new one runs to its end."""
    import threading

    from vllm_runner.engine import detokenizer

    go = threading.Event()
    original = detokenizer.IncrementalDetokenizer.add_tokens

    def flaky(self, token_ids, *args):
        if getattr(self, "poisoned", False):
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == 2:
                go.wait(10)  # (the reader waits here until the id is reused)
                raise RuntimeError("injected front-end detokenizer failure")
        return original(self, token_ids, *args)

    here = apart._detokenizers_here
    first = []

    def poison_first(prompt_ids, params):
        made = here(prompt_ids, params)
        if not first:
            first.append(made)
            for d in made:
                d.poisoned = True
        return made

    monkeypatch.setattr(detokenizer.IncrementalDetokenizer, "add_tokens", flaky)
    monkeypatch.setattr(apart, "_detokenizers_here", poison_first)
    long = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)

    async def main():
        old = apart.stream("Hello", long, request_id="reused")
        await anext(old)
        await old.aclose()
        new = apart.stream("The capital of France is", long, request_id="reused")
        first_update = asyncio.create_task(anext(new))
        await asyncio.sleep(0.3)  # (its add sent)
        go.set()
        return [await first_update] + [o async for o in new]

    outs = run(asyncio.wait_for(main(), 120))
    assert outs[-1].finish_reason == "length" and outs[-1].num_token_ids == 40


def test_requests_are_checked_in_the_caller(apart):
    """Validation needs no round trip: the engine's limits came with its ready message."""

    async def main():
        with pytest.raises(ValueError, match="max_model_len is 1024"):
            async for _ in apart.stream([1] * 2000, GREEDY):
                pass
        with pytest.raises(ValueError, match=r"prompt token id 999999 is outside the vocab"):
            await apart.generate([[999999]], GREEDY)
        apart.check_text_length("short", "prompt")
        with pytest.raises(ValueError, match="more than max_model_len"):
            apart.check_text_length("x" * (apart.inputs.max_prompt_chars + 1), "prompt")
        eos = apart.tokenizer.eos_token_id  # (the engine's EOS ids came with its limits)
        banned = SamplingParams(max_tokens=4, min_tokens=2, allowed_token_ids=[eos])
        with pytest.raises(ValueError, match=rf"allowed_token_ids \[{eos}\] are all stop"):
            await apart.generate([[1, 2]], banned)
        return await apart.generate(["Hello"], GREEDY)

    assert run(main())[0].text


def test_leaving_a_stream_aborts_it_in_the_engine_process(apart):
    params = SamplingParams(max_tokens=500, ignore_eos=True)

    async def main():
        stream = apart.stream("Once upon a time", params, request_id="left")
        async for _ in stream:
            break
        await stream.aclose()
        # the abort is a command like any other: once a later request ends, it was applied
        await apart.generate(["Hi"], SamplingParams(max_tokens=2))
        return [o async for o in apart.stream("Hi", GREEDY, request_id="left")]

    outs = run(main())
    assert outs[-1].finished and outs[-1].num_token_ids == 12
    assert apart.stats()["kv_blocks_used"] == 0 and apart.stats()["num_running"] == 0


def test_ctrl_c_leaves_the_engine_process_to_the_server(apart):
    """Ctrl-C reaches the whole process group: the server shuts down gracefully (in-flight
    streams finish), so the engine process ignores it and waits for the server's stop."""

    async def main():
        stream = apart.stream("Once upon a time", GREEDY)
        first = await anext(stream)
        os.kill(apart._client.process.pid, signal.SIGINT)
        rest = [o async for o in stream]
        return [first, *rest]

    outs = run(main())
    assert outs[-1].finished and outs[-1].num_token_ids == 12
    assert apart._client.process.is_alive() and apart.error is None


@pytest.mark.parametrize("engine_process", [True, False], ids=["process", "thread"])
def test_a_closed_event_loop_leaves_the_engine_to_the_others(default_model_dir, engine_process):
    """A caller that ran its stream on its own event loop, left it and closed that loop
    (e.g. one asyncio.run per call): the outputs still on their way to it (the abort's
    final one) have no reader; they are dropped, and the engine serves everyone else (the
    hand-over to a closed loop raised and ended the results reader / loop thread)."""
    llm = AsyncLLM(default_model_dir, engine_process=engine_process, **KW)
    try:
        loop = asyncio.new_event_loop()

        async def start_and_leave():
            stream = llm.stream("Once upon a time", SamplingParams(max_tokens=400))
            await anext(stream)
            await stream.aclose()  # the abort is sent; its final output comes later

        loop.run_until_complete(start_and_leave())
        loop.close()
        # (a hang guard, not a timing: this request's outputs follow the abort's)
        out = run(asyncio.wait_for(llm.generate(["Hello"], GREEDY), 120))
        assert out[0].finished and llm.error is None
    finally:
        run(llm.shutdown())


def test_a_failed_results_reader_stops_the_engine_process(default_model_dir, monkeypatch):
    """The engine process alive but its results unreadable: its streams fail with the
    reason, and it is stopped (it holds the device's memory), not left running unread."""
    from multiprocessing.connection import Connection

    llm = AsyncLLM(default_model_dir, engine_process=True, **KW)

    def unreadable(*args):
        raise ValueError("injected unpack failure")

    # (the reader's next read, after the one it waits in)
    monkeypatch.setattr(Connection, "recv", unreadable)

    async def main():
        with pytest.raises(RuntimeError, match="results failed: ValueError"):
            async for _ in llm.stream("Hello", GREEDY):
                pass
        await llm.shutdown()

    run(asyncio.wait_for(main(), 120))  # (a hang guard)
    assert not llm._client.process.is_alive() and "injected unpack failure" in llm.error


def test_a_load_error_in_the_engine_process_is_raised_in_the_caller(default_model_dir):
    with pytest.raises(ValueError, match="max_model_len must be >= 2"):
        AsyncLLM(default_model_dir, engine_process=True, device="cpu", max_model_len=1)


def test_a_dead_engine_process_fails_its_streams_and_refuses_new_requests(default_model_dir):
    llm = AsyncLLM(default_model_dir, engine_process=True, **KW)
    params = SamplingParams(max_tokens=800, ignore_eos=True)

    async def main():
        got = []
        with pytest.raises(RuntimeError, match=r"engine process exited \(code -9\)"):
            async for out in llm.stream("Once upon a time", params):
                got.append(out)
                if len(got) == 2:
                    os.kill(llm._client.process.pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match=r"engine process exited \(code -9\)"):
            await llm.generate(["Hello"], GREEDY)
        await llm.shutdown()  # nothing left to stop: returns

    run(main())
    assert llm.error == "the engine process exited (code -9)"


@pytest.mark.parametrize("ending", ["os._exit(0)", "sys.exit(0)"])
def test_the_engine_process_ends_with_the_server_process(default_model_dir, ending):
    """A server killed outright (no shutdown, no atexit) must not leave its engine process
    holding the device, and one that exits without a shutdown must not wait forever for it
    (the engine process ignores SIGTERM): it sees its command pipe close and exits."""
    script = textwrap.dedent(f"""
        import os, sys
        from vllm_runner import AsyncLLM
        llm = AsyncLLM({default_model_dir!r}, engine_process=True, device="cpu",
                       max_model_len=256, cpu_kv_cache_gb=0.05)
        print(llm._client.process.pid, flush=True)
        {ending}
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
    )
    pid = int(done.stdout.split()[-1])
    # the orphan is reparented; wait for it to go (it polls nothing: EOF wakes it)
    for _ in range(600):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        if _is_zombie(pid):
            break
        asyncio.run(asyncio.sleep(0.1))
    else:
        pytest.fail(f"engine process {pid} still running after its server exited")


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True
