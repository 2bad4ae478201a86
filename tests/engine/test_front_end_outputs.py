"""What the front end hands users, pinned exactly: logprobs=0, n > 1 streams, abort of ids
that are not running, and CompletionOutput.finished()."""

import asyncio
import dataclasses

import pytest
from engine_testing import make_llm

from vllm_runner import RequestError, SamplingParams
from vllm_runner.engine.outputs import CompletionOutput, RequestOutput


def test_logprobs_zero_gives_each_sampled_tokens_logprob(llama_dir):
    """vLLM: logprobs=0 returns, per token, a dict of the sampled token's logprob alone (not
    None), and cumulative_logprob is their sum; logprobs=None gives None for both."""
    llm = make_llm(llama_dir)
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=0)
    c = llm.generate([[1, 2, 3, 4]], params)[0].outputs[0]
    assert c.logprobs is not None and len(c.logprobs) == 5
    assert [list(lp) for lp in c.logprobs] == [[t] for t in c.token_ids]
    assert c.cumulative_logprob == pytest.approx(
        sum(lp[t] for t, lp in zip(c.token_ids, c.logprobs, strict=True))
    )
    assert c.cumulative_logprob < 0.0
    (none,) = llm.generate([[1, 2, 3, 4]], dataclasses.replace(params, logprobs=None))
    assert none.outputs[0].logprobs is None and none.outputs[0].cumulative_logprob is None


def test_n_streams_count_each_completions_own_tokens(tiny_async):
    """n = 2: each update names its completion (index 0 or 1); num_token_ids counts that
    completion's tokens so far; text is what its deltas gave; each ends once, finished."""
    params = SamplingParams(n=2, max_tokens=6, temperature=1.0, seed=3, ignore_eos=True)

    async def main():
        return [o async for o in tiny_async.stream([5, 6, 7], params, request_id="pair")]

    updates = asyncio.run(main())
    assert {u.index for u in updates} == {0, 1}
    for index in (0, 1):
        mine = [u for u in updates if u.index == index]
        counts = [u.num_token_ids for u in mine]
        ids = [t for u in mine for t in u.new_token_ids]
        sizes = [len(u.new_token_ids) for u in mine]
        assert counts == [sum(sizes[: i + 1]) for i in range(len(mine))]
        assert len(ids) == 6 and counts[-1] == 6
        assert [u.finished for u in mine] == [False] * (len(mine) - 1) + [True]
        assert mine[-1].finish_reason == "length" and mine[-1].stop_reason is None
        assert mine[-1].text == "".join(u.delta for u in mine)
        assert all(u.request_id == "pair" for u in mine)


def test_abort_of_an_unknown_or_finished_id_changes_nothing(tiny_async):
    """As vLLM's: aborting an id that is not running (never added, or finished) is a no-op;
    the id may be used again, and requests running meanwhile are not touched."""
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)

    async def main():
        done = await tiny_async.generate([[1, 2, 3]], params)
        await tiny_async.abort(["never-added", "x"])
        stream = tiny_async.stream([1, 2, 3], params, request_id="x")
        first = await stream.__anext__()
        await tiny_async.abort("never-added")
        rest = [o async for o in stream]
        await tiny_async.abort("x")  # finished now
        again = [o async for o in tiny_async.stream([1, 2, 3], params, request_id="x")]
        return done[0], [first, *rest], again

    done, first_run, again = asyncio.run(main())
    for run in (first_run, again):
        assert [t for o in run for t in o.new_token_ids] == done.token_ids
        assert run[-1].finished and run[-1].finish_reason == "length"
    assert not tiny_async._entries  # every ended stream's route is gone (no leak per request)


def test_an_aborted_stream_ends_with_abort_and_keeps_its_tokens(tiny_async):
    """abort(id) while a client streams it: its stream ends (no error) with a finished update
    whose finish_reason is "abort"; the tokens it gave stay counted."""
    params = SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True)

    async def main():
        stream = tiny_async.stream([9, 8, 7], params, request_id="cut")
        first = await stream.__anext__()
        await tiny_async.abort("cut")
        return [first, *[o async for o in stream]]

    outs = asyncio.run(main())
    last = outs[-1]
    assert last.finished and last.finish_reason == "abort" and last.error is None
    assert last.num_token_ids == sum(len(o.new_token_ids) for o in outs) < 300
    assert [o.finished for o in outs].count(True) == 1


@pytest.mark.parametrize("reason", ["stop", "length", "abort", "error"])
def test_a_completion_is_finished_whatever_ended_it(reason):
    """vLLM's CompletionOutput.finished(): whether finish_reason is set, for any reason."""
    assert CompletionOutput(0, "", [], finish_reason=reason).finished()
    assert not CompletionOutput(0, "", []).finished()


def test_a_request_outputs_top_level_fields_are_its_first_completions():
    """RequestOutput.text / token_ids / finish_reason read completion 0 (n > 1: not the last)."""
    first = CompletionOutput(0, "a", [1], finish_reason="stop", stop_reason=2)
    second = CompletionOutput(1, "bc", [3, 4], finish_reason="length")
    out = RequestOutput("r", None, [7], [first, second], True)
    assert (out.text, out.token_ids, out.finish_reason, str(out)) == ("a", [1], "stop", "a")


def test_a_second_stream_with_a_running_id_is_refused_and_the_first_goes_on(tiny_async):
    """Two streams may not share an id while the first runs (vLLM refuses a running id): the
    second raises ValueError naming the id, and neither it nor its clean-up aborts the first."""
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

    async def main():
        want = (await tiny_async.generate([[4, 4, 4]], params))[0]
        first = tiny_async.stream([4, 4, 4], params, request_id="dup")
        outs = [await first.__anext__()]
        with pytest.raises(ValueError, match="request_id 'dup' is already in use"):
            await tiny_async.stream([1, 2], params, request_id="dup").__anext__()
        outs += [o async for o in first]
        return want, outs

    want, outs = asyncio.run(main())
    assert [t for o in outs for t in o.new_token_ids] == want.token_ids
    assert outs[-1].finish_reason == "length"


def test_a_failed_prompt_of_generate_leaves_the_others_results_in_order(tiny_async, monkeypatch):
    """generate() with one failing prompt raises RequestError once all have ended; its
    ``results`` hold every prompt's RequestOutput or RequestError, in prompt order."""
    from vllm_runner.engine import core

    original = core.apply_step_output

    def failing(state, index, out):
        if state.prompt_token_ids == [6, 6, 6]:
            raise RuntimeError("injected failure")
        return original(state, index, out)

    monkeypatch.setattr(core, "apply_step_output", failing)
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    with pytest.raises(RequestError, match="injected failure") as info:
        asyncio.run(tiny_async.generate([[1, 2, 3], [6, 6, 6], [4, 5]], params))
    good, bad, other = info.value.results
    assert isinstance(bad, RequestError) and "injected failure" in str(bad)
    assert [good.prompt_token_ids, other.prompt_token_ids] == [[1, 2, 3], [4, 5]]
    assert all(r.finished and len(r.token_ids) == 3 for r in (good, other))
    assert not tiny_async._entries


@pytest.mark.parametrize("skip", [True, False])
def test_text_built_in_the_front_end_keeps_special_tokens_as_asked(default_model_dir, skip):
    """A front end that builds a request's text (engine in a process of its own) honours
    skip_special_tokens as vLLM does: False keeps a special token's text."""
    from vllm_runner.engine.stream_route import text_builders
    from vllm_runner.tokenizer import load_tokenizer

    tok = load_tokenizer(default_model_dir)
    params = SamplingParams(max_tokens=4, skip_special_tokens=skip)
    [d] = text_builders(tok, tok.encode("Hi."), params)
    d.add_tokens([*tok.encode(" Hello there"), tok.eos_token_id])
    assert d.text == " Hello there" + ("" if skip else tok.eos_token)


def test_an_interrupted_generate_leaves_no_request_to_the_next_call(llama_dir):
    """Ctrl-C in LLM.generate (here from its progress bar, after the first step): the
    prompts it added, scheduled or still waiting, are aborted; the next call runs alone."""

    class Interrupting:
        def __init__(self, **kw) -> None:
            self.n = 0

        def update(self, k: int) -> None:
            raise KeyboardInterrupt

        def close(self) -> None:
            pass

    llm = make_llm(llama_dir, max_num_seqs=1)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    with pytest.raises(KeyboardInterrupt):
        llm.generate([[1, 2, 3], [4, 5, 6], [7, 8, 9]], params, use_tqdm=Interrupting)
    assert (llm.stats()["num_running"], llm.stats()["num_waiting"]) == (0, 0)
    out = llm.generate([[4, 5, 6]], params)
    assert len(out) == 1 and len(out[0].token_ids) == 8
    assert llm.stats()["kv_blocks_used"] == 0


def test_a_stop_string_on_the_last_allowed_token_is_a_stop(smol_llm):
    """The token that reaches max_tokens also completes a stop string: as vLLM, the request
    ended because of the stop string (finish_reason "stop", stop_reason the string, cut)."""
    free = smol_llm.generate(
        ["The capital of France is"], SamplingParams(max_tokens=6, temperature=0.0)
    )[0]
    tok = smol_llm.get_tokenizer()
    last = tok.decode(free.token_ids[-1:])
    assert last.strip() and last not in free.text[: -len(last)]
    params = SamplingParams(max_tokens=6, temperature=0.0, stop=[last])
    out = smol_llm.generate(["The capital of France is"], params)[0]
    assert (out.finish_reason, out.outputs[0].stop_reason) == ("stop", last)
    assert out.text == free.text[: -len(last)]


def test_generate_raises_the_first_failed_prompts_error(tiny_async, monkeypatch):
    """Two prompts fail: the RequestError raised is the first one's (in prompt order)."""
    from vllm_runner.engine import core

    original = core.apply_step_output

    def failing(state, index, out):
        if state.prompt_token_ids in ([6, 6], [7, 7]):
            raise RuntimeError(f"injected failure of {state.prompt_token_ids}")
        return original(state, index, out)

    monkeypatch.setattr(core, "apply_step_output", failing)
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    with pytest.raises(RequestError, match=r"injected failure of \[6, 6\]"):
        asyncio.run(tiny_async.generate([[1, 2], [6, 6], [7, 7]], params))


def test_a_stream_whose_output_failed_here_aborts_its_request(tiny_async, monkeypatch):
    """Making an update whole failed in the front end (OutputFailed): the stream raises it,
    and the request, still running in the engine, is aborted (not left to run unread to its
    max_tokens, holding its blocks)."""
    from vllm_runner.engine.errors import OutputFailed
    from vllm_runner.engine.stream_route import StreamRoute

    whole = StreamRoute.whole

    def failing(self, item):
        if self.request_id == "bad":
            raise RuntimeError("injected output failure")
        return whole(self, item)

    monkeypatch.setattr(StreamRoute, "whole", failing)
    long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)

    async def main():
        with pytest.raises(OutputFailed, match="injected output failure"):
            async for _ in tiny_async.stream([1, 2, 3], long, request_id="bad"):
                pass
        # (commands are applied in order: the abort before this request is added)
        return await tiny_async.generate([[4, 5]], SamplingParams(max_tokens=2))

    assert len(asyncio.run(main())[0].token_ids) <= 2
    assert tiny_async.stats()["num_running"] == 0 and tiny_async.stats()["kv_blocks_used"] == 0


def test_stats_follow_the_steps_delivered(tiny_async):
    """stats() is the last delivered step's: a running request shows (its blocks held), and
    it is gone from them once its final output is read."""
    long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)

    async def main():
        stream = tiny_async.stream([1, 2, 3], long, request_id="counted")
        await anext(stream)
        running = tiny_async.stats()
        await tiny_async.abort("counted")
        outs = [o async for o in stream]
        return running, outs[-1]

    running, last = asyncio.run(main())
    assert running["num_running"] == 1 and running["kv_blocks_used"] > 0
    assert last.finish_reason == "abort"
    assert tiny_async.stats()["num_running"] == 0 and tiny_async.stats()["kv_blocks_used"] == 0


def test_an_output_failure_in_generate_fails_that_prompt_alone(tiny_async, monkeypatch):
    """OutputFailed is a RequestError: generate() collects it among the other prompts'
    results (it does not raise it bare, losing theirs)."""
    from vllm_runner.engine.errors import OutputFailed
    from vllm_runner.engine.stream_route import StreamRoute

    whole = StreamRoute.whole

    def failing(self, item):
        if self.prompt_ids == [6, 6]:
            raise RuntimeError("injected output failure")
        return whole(self, item)

    monkeypatch.setattr(StreamRoute, "whole", failing)
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    with pytest.raises(RequestError, match="injected output failure") as info:
        asyncio.run(tiny_async.generate([[1, 2], [6, 6], [7, 7]], params))
    good, bad, other = info.value.results
    assert isinstance(bad, OutputFailed)
    assert [good.prompt_token_ids, other.prompt_token_ids] == [[1, 2], [7, 7]]
