"""LLM / AsyncLLM calls at the edges of their API: prompt shapes, request ids reused at once,
one SamplingParams shared by two engines."""

import asyncio
import json
import shutil
import threading

import pytest
from engine_testing import GREEDY, make_llm

from vllm_runner import AsyncLLM, SamplingParams, TextPrompt, TokensPrompt


def test_prompt_dicts_as_vllm(smol_llm):
    """vLLM's TextPrompt / TokensPrompt dicts (``{"prompt": text}``, ``{"prompt_token_ids":
    ids}``: a vLLM script's only way to pass token ids) are prompts: one, or several in a list
    mixed with strings and id lists, each as its text or ids (they were refused). A key this
    engine has no use for (multi-modal data) is refused naming it, not ignored."""
    text = "The capital of France is"
    ids = smol_llm.get_tokenizer().encode(text)
    want = smol_llm.generate(text, GREEDY)[0]
    assert want.prompt_token_ids == ids
    for prompt in (TextPrompt(prompt=text), TokensPrompt(prompt_token_ids=ids)):
        (one,) = smol_llm.generate(prompt, GREEDY)
        assert one.token_ids == want.token_ids
    mixed = [{"prompt": text}, {"prompt_token_ids": ids}, text, ids]
    outs = smol_llm.generate(mixed, GREEDY)
    assert [o.token_ids for o in outs] == [want.token_ids] * 4
    assert [o.prompt for o in outs] == [text, None, text, None]  # (as vLLM's)
    both = {"prompt": "Hello", "prompt_token_ids": ids}
    assert smol_llm.engine.inputs.tokenize(both) == ids  # (the ids, as vLLM)
    for bad, match in [
        ({"prompt": text, "multi_modal_data": {}}, r"prompt dict key\(s\) \['multi_modal_data'\]"),
        ({}, r"a prompt dict needs 'prompt' \(text\) or 'prompt_token_ids'"),
        ({"prompt": ids}, "'prompt' must be a string, got list"),
        ({"prompt_token_ids": text}, "'prompt_token_ids' must be a list of token ids, got str"),
    ]:
        with pytest.raises(ValueError, match=match):
            smol_llm.generate([text, bad], GREEDY)


def test_async_llm_takes_prompt_dicts(tiny_async):
    """AsyncLLM's generate and stream take vLLM's prompt dicts too (here, in its engine's
    thread; an engine process gets the dict as it is and reads it alike)."""

    async def main():
        want = await tiny_async.generate([[1, 2, 3]], GREEDY)
        got = await tiny_async.generate([{"prompt_token_ids": [1, 2, 3]}], GREEDY)
        streamed = [o async for o in tiny_async.stream({"prompt_token_ids": [1, 2, 3]}, GREEDY)]
        return want[0], got[0], streamed

    want, got, streamed = asyncio.run(main())
    assert got.token_ids == want.token_ids and got.prompt is None
    assert [t for o in streamed for t in o.new_token_ids] == want.token_ids


def test_an_id_is_free_once_its_stream_showed_it_finished(tiny_async):
    """A caller that stops reading at the update that says ``finished`` may reuse the id at
    once: the request has ended (its stream, not yet closed, held the id until collected)."""
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)

    async def main():
        async for out in tiny_async.stream([1, 2, 3], params, request_id="again"):
            if out.finished:
                break
        return [o async for o in tiny_async.stream([4, 5, 6], params, request_id="again")]

    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].finish_reason == "length"
    assert outs[-1].num_token_ids == 4


def test_one_sampling_params_shared_by_two_models_keeps_each_its_eos(
    tiny_async, llama_dir, tmp_path
):
    """The same SamplingParams given to two engines whose models end on different EOS ids:
    each request stops on its own model's EOS only (the engine wrote its EOS ids into the
    caller's object, so the running request took the other model's)."""
    prompt = [1, 2, 3]
    free = make_llm(llama_dir).generate([prompt], GREEDY)[0].token_ids
    own_eos = tiny_async.engine.eos_ids
    assert not own_eos & set(free)
    at = next(i for i in range(2, len(free)) if free[i] not in free[:i])
    other = shutil.copytree(llama_dir, tmp_path / "other_eos")
    for name in ("config.json", "generation_config.json"):
        config = json.loads((other / name).read_text())
        config["eos_token_id"] = free[at]
        (other / name).write_text(json.dumps(config))
    other_llm = make_llm(str(other))
    params = SamplingParams(max_tokens=len(free), temperature=0.0)

    stepping, go = threading.Event(), threading.Event()
    step = tiny_async.engine.step

    def held_step(*args, **kwargs):  # the request added, its first step waits for `go`
        stepping.set()
        go.wait()
        return step(*args, **kwargs)

    async def main():
        task = asyncio.create_task(tiny_async.generate([prompt], params))
        await asyncio.to_thread(stepping.wait)
        other_llm.generate([[7, 8, 9]], params)  # meanwhile, the other model runs one
        go.set()
        return await task

    tiny_async.engine.step = held_step
    try:
        (out,) = asyncio.run(main())
    finally:
        go.set()
        del tiny_async.engine.step
    assert out.finish_reason == "length" and out.token_ids == free


def test_a_stream_added_as_the_loop_dies_fails_instead_of_waiting_forever(llama_dir):
    """The loop failed every stream it saw when it died; a stream that registered just after
    (its "is it running" check passed just before) was never answered and waited forever."""
    from vllm_runner import EngineDeadError

    llm = AsyncLLM(llama_dir, dtype="float32", device="cpu", cpu_kv_cache_gb=0.05)

    class DiesFirst(dict):  # the loop dies between the stream's check and its registration
        def __setitem__(self, route, entry):
            llm._send(("malformed",))
            llm._thread.join()
            super().__setitem__(route, entry)

    llm._entries = DiesFirst()

    async def main():
        with pytest.raises(EngineDeadError, match="the engine loop failed"):
            await llm.generate([1, 2, 3], GREEDY)

    asyncio.run(asyncio.wait_for(main(), 60))  # (a hang guard)
    assert not llm._entries  # (its route is not left behind)
    asyncio.run(llm.shutdown())


def test_an_open_stream_fails_with_the_reason_the_loop_died(llama_dir):
    """The loop dies while a stream reads: it raises EngineDeadError naming why (not "shut
    down", which no one did), and so does the next request."""
    from vllm_runner import EngineDeadError

    llm = AsyncLLM(llama_dir, dtype="float32", device="cpu", cpu_kv_cache_gb=0.05)
    long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)

    async def main():
        stream = llm.stream([1, 2, 3], long)
        await anext(stream)
        llm._send(("malformed",))
        with pytest.raises(EngineDeadError, match="the engine loop failed"):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError, match="the engine loop failed"):
            await llm.generate([1, 2, 3], GREEDY)

    asyncio.run(asyncio.wait_for(main(), 60))  # (a hang guard)
    asyncio.run(llm.shutdown())


def test_chat_takes_openai_content_parts_and_an_assistant_message_without_content(smol_llm):
    """As vLLM's LLM.chat and this server's chat route: a message's text parts are lines of
    one text, and an assistant message's content may be None or left out (the template failed
    on parts and None: "can only concatenate str (not "list") to str"); a part that is not
    text is refused naming its type."""
    text = [{"role": "user", "content": "Hi\nthere"}, {"role": "assistant", "content": ""}]
    lines = [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]
    parts = [{"role": "user", "content": lines}, {"role": "assistant", "content": None}]
    options = {"add_generation_prompt": False, "continue_final_message": True}
    assert smol_llm.apply_chat_template(parts, **options) == smol_llm.apply_chat_template(
        text, **options
    )
    assert lines[0] == {"type": "text", "text": "Hi"}  # the caller's, unchanged
    # content left out, as OpenAI's assistant message may and vLLM's LLM.chat takes (it was
    # refused: "must be a dict with 'role' and 'content'")
    bare = [parts[0], {"role": "assistant"}]
    assert smol_llm.apply_chat_template(bare, **options) == smol_llm.apply_chat_template(
        text, **options
    )
    with pytest.raises(ValueError, match=r"messages\[1\] must be a dict with a 'role'"):
        smol_llm.chat([parts[0], {"content": "hi"}])
    image = [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    with pytest.raises(ValueError, match=r"messages\[0\] content part 0 has type 'image_url'"):
        smol_llm.chat([{"role": "user", "content": image}])


def test_get_tokenizer_as_vllm(smol_llm, tiny_async):
    """`llm.get_tokenizer()` (and AsyncLLM's, awaited, as vLLM's) is the engine's tokenizer:
    a vLLM script that templates or counts tokens with it runs as written."""
    tokenizer = smol_llm.get_tokenizer()
    ids = tokenizer.encode("The capital of France is")
    assert smol_llm.generate([ids], GREEDY)[0].prompt_token_ids == ids
    assert smol_llm.llm_engine.get_tokenizer() is tokenizer is not None
    assert asyncio.run(tiny_async.get_tokenizer()) is tiny_async.tokenizer


def test_abort_takes_a_list_of_ids_as_vllm(tiny_async):
    """`abort(["a", "b"])` (vLLM's `str | Iterable[str]`) aborts each; it reached the loop
    as one unhashable id, whose TypeError killed the engine: every stream failed. An id that
    is not a string is refused in the caller, naming it."""
    long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)

    async def read(stream) -> list:
        return [out async for out in stream]

    async def main():
        streams = [tiny_async.stream([1, 2, 3], long, request_id=r) for r in ("a1", "a2")]
        firsts = [await s.__anext__() for s in streams]
        await tiny_async.abort(["a1", "a2"])
        rests = [await read(s) for s in streams]
        for bad, kind in ((5, "int"), (["a1", None], "NoneType")):
            with pytest.raises(ValueError, match=f"request ids must be strings, got {kind}"):
                await tiny_async.abort(bad)
        return [(firsts[i], *rests[i]) for i in range(2)], await tiny_async.generate([4], GREEDY)

    outs, after = asyncio.run(main())
    assert [o[-1].finish_reason for o in outs] == ["abort", "abort"]
    assert all(o[-1].num_token_ids < 400 for o in outs)
    assert len(after[0].token_ids) == GREEDY.max_tokens


def test_an_engine_process_that_could_not_start_raises_its_own_error(llama_dir, monkeypatch):
    """Starting the engine process failed (fork / spawn: out of memory, too many processes;
    or a script without the main guard, in the child): the clean-up killed the process never
    started and raised AttributeError ("'NoneType' object has no attribute 'kill'") instead."""
    import multiprocessing.process

    def no_start(self):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", no_start)
    with pytest.raises(OSError, match="Cannot allocate memory"):
        AsyncLLM(llama_dir, engine_process=True, dtype="float32", device="cpu")


@pytest.mark.parametrize(
    "switch, value", [("engine_process", "false"), ("log_stats", "no"), ("engine_process", 0)]
)
def test_async_llm_switches_are_true_or_false(llama_dir, switch, value):
    """As the engine's own switches (enforce_eager): a string was read as true (an engine
    process started for engine_process="false"; metrics for log_stats="no")."""
    with pytest.raises(ValueError, match=f"{switch} must be True or False, got {value!r}"):
        AsyncLLM(llama_dir, dtype="float32", device="cpu", cpu_kv_cache_gb=0.05, **{switch: value})


def test_a_stream_request_id_is_a_string(tiny_async):
    """As ``abort``'s: an int id was taken (and the caller's ``abort(5)`` then refused it);
    a list failed as "unhashable type: 'list'"."""

    async def main():
        for bad, kind in ((5, "int"), (["a"], "list")):
            with pytest.raises(ValueError, match=f"request_id must be a string, got {kind}"):
                await anext(tiny_async.stream([1, 2, 3], GREEDY, request_id=bad))

    asyncio.run(main())


def test_trust_remote_code_is_taken_as_vllm_scripts_pass_it(llama_dir):
    """Accepted (it was refused as an unknown argument); the engine never runs repository
    code, so a supported model loads and generates the same either way."""
    want = make_llm(llama_dir).generate([[1, 2, 3]], GREEDY)[0].token_ids
    for value in (True, False):
        llm = make_llm(llama_dir, trust_remote_code=value)
        assert llm.generate([[1, 2, 3]], GREEDY)[0].token_ids == want
    for bad in ("yes", 1, None):
        with pytest.raises(
            ValueError, match=f"trust_remote_code must be true or false, got {bad!r}"
        ):
            make_llm(llama_dir, trust_remote_code=bad)


def test_trust_remote_code_does_not_load_a_model_type_only_its_repository_defines(
    llama_dir, tmp_path
):
    """Refused as before, True or not (the message says the engine never runs that code)."""
    shutil.copytree(llama_dir, tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    config["model_type"] = "custom_llama"
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig"}
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    (tmp_path / "model" / "configuration_custom.py").write_text(
        "raise RuntimeError('repository code ran')\n"
    )
    for engine_class in (make_llm, lambda *a, **kw: AsyncLLM(*a, device="cpu", **kw)):
        with pytest.raises(ValueError, match=r"model_type 'custom_llama', .* never runs"):
            engine_class(str(tmp_path / "model"), trust_remote_code=True)


def test_use_tqdm_shows_a_progress_bar_of_finished_prompts(smol_llm, capsys):
    """As vLLM's generate / chat (whose default is True: here False); a vLLM script passing
    it got a TypeError."""
    params = SamplingParams(max_tokens=2, temperature=0.0)
    quiet = smol_llm.generate(["a", "b", "c"], params)
    assert capsys.readouterr().err == ""
    shown = smol_llm.generate(["a", "b", "c"], params, use_tqdm=True)
    assert "Processed prompts" in capsys.readouterr().err
    assert [o.token_ids for o in shown] == [o.token_ids for o in quiet]
    updates: list[int] = []

    class Bar:  # a tqdm-like class, as vLLM takes
        def __init__(self, total: int, **options) -> None:
            self.total, self.n = total, 0

        def update(self, k: int) -> None:
            self.n += k
            updates.append(self.n)

        def close(self) -> None:
            updates.append(-self.total)

    smol_llm.chat([{"role": "user", "content": "hi"}], params, use_tqdm=Bar)
    assert updates[-2:] == [1, -1] and updates == sorted(updates[:-1]) + [-1]
    with pytest.raises(ValueError, match="use_tqdm must be True, False or a tqdm-like class"):
        smol_llm.generate("a", params, use_tqdm="yes")
    bars: list[Bar] = []  # a function that makes the bar: as vLLM's Callable[..., tqdm]
    smol_llm.generate(["a", "b"], params, use_tqdm=lambda **kw: bars.append(Bar(**kw)) or bars[0])
    assert bars[0].total == 2 and updates[-2:] == [2, -2]


def test_chat_template_kwargs_are_template_variables(smol_llm):
    """As vLLM's LLM.chat (e.g. enable_thinking); the template call's own arguments are
    refused there."""
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{{ suffix | default('') }}"
    chat = [{"role": "user", "content": "hi"}]
    out = smol_llm.chat(chat, GREEDY, chat_template=template,
                        chat_template_kwargs={"suffix": " there"})  # fmt: skip
    assert out[0].prompt == "hi there"
    with pytest.raises(
        ValueError, match=r"may not set the template call's own arguments \['tokenize'\]"
    ):
        smol_llm.chat(chat, GREEDY, chat_template=template, chat_template_kwargs={"tokenize": 1})
    with pytest.raises(ValueError, match="chat_template_kwargs must be a dict, got 'x'"):
        smol_llm.chat(chat, GREEDY, chat_template=template, chat_template_kwargs="x")


def test_chat_gives_the_template_its_tools(smol_llm):
    """As vLLM's LLM.chat(tools=...): the template renders them (not parsed for calls)."""
    template = (
        "{% for t in tools or [] %}[{{ t.function.name }}]{% endfor %}{{ messages[0].content }}"
    )
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    chat = [{"role": "user", "content": "hi"}]
    assert smol_llm.chat(chat, GREEDY, chat_template=template, tools=tools)[0].prompt == (
        "[get_weather]hi"
    )
    with pytest.raises(ValueError, match="tools must be a list of tool dicts, got 'get_weather'"):
        smol_llm.chat(chat, GREEDY, chat_template=template, tools="get_weather")


def test_chat_template_kwargs_may_not_replace_the_messages(smol_llm):
    """``messages`` is the conversation's own template variable: refused naming it (it was a
    TypeError from jinja, "render() got multiple values for keyword argument 'messages'",
    naming neither chat_template_kwargs nor the way out; a 400 of that text on the route)."""
    chat = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match=r"template call's own arguments \['messages'\]"):
        smol_llm.chat(chat, GREEDY, chat_template_kwargs={"messages": []})


def test_seed_none_draws_a_seed_per_engine(llama_dir):
    """vLLM's ``seed=None`` (was refused): each engine seeds its sampling with a random seed of
    its own, so two engines' unseeded samples differ; a request's own seed still repeats."""
    llms = [make_llm(llama_dir, seed=None) for _ in range(2)]
    seeds = {llm.engine.model_config.seed for llm in llms}
    assert len(seeds) == 2 and all(0 <= s < 2**63 for s in seeds)
    seeded = SamplingParams(max_tokens=8, seed=7, ignore_eos=True)
    a, b = (llm.generate([[1, 2, 3]], seeded)[0].token_ids for llm in llms)
    assert a == b and len(a) == 8


def test_the_progress_bar_counts_each_finished_prompt_once(smol_llm):
    """Prompts that finish at different steps: the bar reaches the number of prompts, not
    the sum of the counts finished at each step."""
    seen: list[int] = []

    class Bar:
        def __init__(self, total: int, **options) -> None:
            self.n = 0

        def update(self, k: int) -> None:
            self.n += k
            seen.append(self.n)

        def close(self) -> None:
            pass

    short, long = (SamplingParams(max_tokens=k, temperature=0.0, ignore_eos=True) for k in (1, 4))
    smol_llm.generate([[1, 2, 3], [4, 5, 6]], [short, long], use_tqdm=Bar)
    assert seen[0] == 1 and seen[-1] == 2 and seen == sorted(seen)


def test_chat_takes_a_batch_of_conversations(smol_llm):
    """As vLLM's LLM.chat: a list of conversations is one prompt each, in order."""
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    chats = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "there"}]]
    outs = smol_llm.chat(chats, SamplingParams(max_tokens=1), chat_template=template)
    assert [o.prompt for o in outs] == ["hi", "there"]
