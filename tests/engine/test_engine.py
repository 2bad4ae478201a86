"""Engine behaviour on CPU: batch invariance, prefix caching, preemption, n > 1, async
scheduling, failures and request bookkeeping."""

import pytest
from engine_testing import GREEDY, make_llm, prompts

from vllm_runner import LLM, SamplingParams


def test_batch_invariance_alone_batched_and_chunked(llama_dir):
    batch = prompts(16, seed=3)
    target = batch[5]
    alone = make_llm(llama_dir).generate([target], GREEDY)[0].token_ids
    batched = make_llm(llama_dir).generate(batch, GREEDY)[5].token_ids
    chunked_llm = make_llm(llama_dir, max_num_batched_tokens=7)
    chunked = chunked_llm.generate(batch, GREEDY)[5].token_ids
    assert alone == batched == chunked
    assert chunked_llm.stats()["kv_blocks_used"] == 0


def test_batch_invariance_default_model(smol_llm):
    texts = [f"Question {i}: what is {i} plus {i * 3}? Answer:" for i in range(16)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    alone = smol_llm.generate([texts[7]], params)[0].token_ids
    batched = smol_llm.generate(texts, params)[7].token_ids
    assert alone == batched


def test_prefix_cache_hit_computes_only_new_tokens(llama_dir):
    block = 16
    shared = prompts(1, seed=9)[0][:5] * 10  # 50 tokens: 3 full blocks + 2
    first, second = shared[: 3 * block] + [1, 2, 3], shared[: 3 * block] + [7, 8, 9, 10]
    cached = make_llm(llama_dir)
    cached.generate([first], GREEDY)
    before = cached.stats()
    out = cached.generate([second], GREEDY)[0]
    after = cached.stats()
    assert after["prefix_cache_hits"] - before["prefix_cache_hits"] == 3 * block
    assert after["prefix_cache_queries"] - before["prefix_cache_queries"] == len(second)
    uncached = make_llm(llama_dir, enable_prefix_caching=False).generate([second], GREEDY)[0]
    assert out.token_ids == uncached.token_ids
    assert out.num_cached_tokens == 3 * block


def test_preemption_when_cache_is_too_small(llama_dir):
    batch = prompts(16, seed=5)
    reference = [o.token_ids for o in make_llm(llama_dir).generate(batch, GREEDY)]
    small = make_llm(llama_dir, num_kv_blocks=12, enable_prefix_caching=False)
    outs = small.generate(batch, GREEDY)
    assert [o.token_ids for o in outs] == reference
    stats = small.stats()
    assert stats["num_preemptions"] > 0
    assert stats["kv_blocks_used"] == 0 and stats["num_running"] == 0


def test_n_completions_share_prompt_blocks(llama_dir):
    llm = make_llm(llama_dir)
    prompt = list(range(100, 150))  # 50 tokens: 3 full blocks
    out = llm.generate([prompt], SamplingParams(n=4, max_tokens=8, temperature=1.0, seed=1))[0]
    assert len(out.outputs) == 4 and [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 8 for c in out.outputs)
    assert llm.stats()["prefix_cache_hits"] == 3 * 48  # siblings 2..4 reuse 3 blocks each
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_max_model_len_finishes_with_length(llama_dir):
    llm = make_llm(llama_dir, max_model_len=40)
    out = llm.generate([list(range(1, 31))], SamplingParams(max_tokens=100, ignore_eos=True))[0]
    assert len(out.token_ids) == 10 and out.finish_reason == "length"


def test_admission_interval_gives_the_same_tokens(llama_dir):
    """Requests held back a few steps (admission_interval, max_num_seqs=4 so that most join
    while others decode) get the tokens they get when admitted at once."""
    batch = prompts(12, seed=22)
    params = [SamplingParams(max_tokens=3 + i, temperature=0.0, ignore_eos=True) for i in range(12)]
    at_once = make_llm(llama_dir, max_num_seqs=4).generate(batch, params)
    held = make_llm(llama_dir, max_num_seqs=4, admission_interval=3)
    assert [o.token_ids for o in held.generate(batch, params)] == [o.token_ids for o in at_once]
    assert held.stats()["kv_blocks_used"] == 0


def test_async_scheduling_pipeline_matches_sync(llama_dir):
    """The overlapped pipeline (step N + 1 launched before step N's tokens are read) gives
    the same tokens, also through preemption, stop tokens and max_model_len."""
    batch = prompts(16, seed=21)
    params = [SamplingParams(max_tokens=5 + i, temperature=0.0, ignore_eos=True) for i in range(16)]
    sync = make_llm(llama_dir, async_scheduling=False).generate(batch, params)
    piped = make_llm(llama_dir, async_scheduling=True)
    assert [o.token_ids for o in piped.generate(batch, params)] == [o.token_ids for o in sync]
    small = make_llm(llama_dir, async_scheduling=True, num_kv_blocks=12)
    assert [o.token_ids for o in small.generate(batch, params)] == [o.token_ids for o in sync]
    assert small.stats()["num_preemptions"] > 0 and small.stats()["kv_blocks_used"] == 0
    stop_at = sync[3].token_ids[2]
    stopped = piped.generate(
        [batch[3]],
        SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_at]),
    )[0]
    assert stopped.token_ids == sync[3].token_ids[: sync[3].token_ids.index(stop_at) + 1]
    seeded = SamplingParams(max_tokens=12, temperature=1.0, seed=5, ignore_eos=True)
    assert (
        piped.generate([batch[0]], seeded)[0].token_ids
        == make_llm(llama_dir, async_scheduling=False).generate([batch[0]], seeded)[0].token_ids
    )
    assert piped.stats()["kv_blocks_used"] == 0


def test_penalties_overlap_steps_and_match_sync(llama_dir):
    """Penalties no longer force synchronous steps: the token still on the device counts
    (repetition, frequency, presence), so overlapped steps give the synchronous tokens, with
    plain greedy and seeded rows in the same batch, through preemption too."""
    batch = prompts(10, seed=8)
    kinds = [dict(repetition_penalty=1.6), dict(frequency_penalty=1.5),
             dict(presence_penalty=1.8, repetition_penalty=0.7), {},
             dict(temperature=1.0, seed=3, frequency_penalty=0.9)]  # fmt: skip
    params = [SamplingParams(**{"max_tokens": 14, "temperature": 0.0, "ignore_eos": True,
                                **kinds[i % len(kinds)]}) for i in range(len(batch))]  # fmt: skip
    sync = [
        o.token_ids for o in make_llm(llama_dir, async_scheduling=False).generate(batch, params)
    ]
    piped = make_llm(llama_dir, async_scheduling=True)
    launches = []
    launch = piped.engine.runner.launch
    piped.engine.runner.launch = lambda sched, overlap: (
        launches.append(overlap) or launch(sched, overlap)
    )
    assert [o.token_ids for o in piped.generate(batch, params)] == sync
    assert all(launches) and len(launches) > 14
    small = make_llm(llama_dir, async_scheduling=True, num_kv_blocks=12)
    assert [o.token_ids for o in small.generate(batch, params)] == sync
    assert small.stats()["num_preemptions"] > 0
    greedy = SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True)
    plain = [o.token_ids for o in make_llm(llama_dir).generate(batch, greedy)]
    assert sync[0] != plain[0] and sync[1] != plain[1]  # the penalties do act


def test_logprobs_overlap_steps_and_match_sync(llama_dir):
    """Overlapped steps copy logprobs with the sampled ids (the next step reads them): equal
    to synchronous steps' (greedy, seeded, penalised rows and rows asking none in one batch,
    through preemption); a request asking for prompt logprobs makes steps synchronous."""
    batch = prompts(8, seed=12)
    kinds = [dict(logprobs=3), dict(logprobs=0, temperature=1.0, seed=4), {},
             dict(logprobs=1, repetition_penalty=1.4)]  # fmt: skip
    params = [SamplingParams(**{"max_tokens": 10, "temperature": 0.0, "ignore_eos": True,
                                **kinds[i % len(kinds)]}) for i in range(len(batch))]  # fmt: skip
    sync = make_llm(llama_dir, async_scheduling=False).generate(batch, params)
    launches = []
    for kw in ({}, {"num_kv_blocks": 10}):
        piped = make_llm(llama_dir, async_scheduling=True, **kw)
        launch = piped.engine.runner.launch
        piped.engine.runner.launch = lambda sched, overlap, launch=launch: (
            launches.append(overlap) or launch(sched, overlap)
        )
        got = piped.generate(batch, params)
        assert all(launches) and len(launches) > 10
        assert kw == {} or piped.stats()["num_preemptions"] > 0
        launches.clear()
        for a, b in zip((o.outputs[0] for o in got), (o.outputs[0] for o in sync), strict=True):
            assert a.token_ids == b.token_ids and (a.logprobs is None) == (b.logprobs is None)
            assert a.cumulative_logprob == pytest.approx(b.cumulative_logprob, abs=1e-5)
            for x, y in zip(a.logprobs or [], b.logprobs or [], strict=True):
                assert list(x) == list(y) and all(abs(x[t] - y[t]) < 1e-5 for t in x)
    scored = SamplingParams(max_tokens=12, ignore_eos=True, prompt_logprobs=1)  # outlives [0]
    piped.generate(batch[:2], [params[0], scored])
    assert launches and not any(launches)


def test_startup_gc_freeze_leaves_engines_collectable(llama_dir):
    """The engine freezes import-time objects once per process (a full GC pass over them
    stalls steps); an engine made later, even one caught in a reference cycle, still frees."""
    import gc
    import weakref

    first = LLM(llama_dir, num_kv_blocks=8)  # freezes, if no engine did before in this process
    frozen = gc.get_freeze_count()
    llm = LLM(llama_dir, num_kv_blocks=8)
    assert gc.get_freeze_count() == frozen  # no second freeze
    llm.engine.cycle = llm.engine  # only the cycle collector can free this one
    engine = weakref.ref(llm.engine)
    del llm
    gc.collect()
    assert engine() is None
    del first


@pytest.mark.parametrize(
    ("family", "quantization"), [("llama", None), ("llama", "int8"), ("opt", None)]
)
def test_a_dropped_engine_leaves_nothing_for_the_collector(tiny_model_dirs, family, quantization):
    """`del llm` frees every tensor by reference counting: nothing waits for a gc pass,
    which engines defer while they run (a layer's weight loader, bound to the layer and kept
    on its parameter, once held a model's weights on the device after the engine was gone)."""
    import gc

    import torch

    llm = LLM(tiny_model_dirs[family], num_kv_blocks=8, quantization=quantization)
    llm.generate(prompts(2, seed=1), SamplingParams(max_tokens=4, ignore_eos=True))
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what a pass finds lands in gc.garbage, kept for a look
    try:
        del llm
        gc.collect()
        left = [tuple(o.shape) for o in gc.garbage if isinstance(o, torch.Tensor)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert left == []


def test_one_prompt_of_token_ids_as_a_list_or_a_tuple(llama_dir):
    """A list or a tuple of ints is one prompt of token ids, not a batch of int prompts."""
    llm = make_llm(llama_dir)
    ids = prompts(1, seed=4)[0]
    (as_list,) = llm.generate(ids, GREEDY)
    (as_tuple,) = llm.generate(tuple(ids), GREEDY)
    assert as_tuple.prompt_token_ids == as_list.prompt_token_ids == ids
    assert as_tuple.token_ids == as_list.token_ids


def test_failed_launch_keeps_the_launched_steps_tokens(llama_dir, monkeypatch):
    """With steps overlapped, a forward that fails fails its requests, after the step
    launched before it is finished and its tokens kept (its staged inputs are consumed
    before another launch can reuse their buffer); the engine then serves on."""
    llm = make_llm(llama_dir, async_scheduling=True)
    launch = llm.engine.runner.launch
    calls = []

    def failing_fourth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("injected forward failure")
        return launch(*args, **kwargs)

    monkeypatch.setattr(llm.engine.runner, "launch", failing_fourth)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    out = llm.generate(prompts(2, seed=5), params)
    # launches 1-3 (prefill, two decodes) each gave a token; the fourth failed
    assert [len(o.outputs[0].token_ids) for o in out] == [3, 3]
    assert all(o.outputs[0].finish_reason == "error" for o in out)
    monkeypatch.setattr(llm.engine.runner, "launch", launch)
    again = llm.generate(prompts(2, seed=5), params)
    assert [len(o.outputs[0].token_ids) for o in again] == [10, 10]
    assert llm.stats()["kv_blocks_used"] == 0


def test_overlapped_steps_after_a_chunked_prefill(llama_dir):
    """A prompt prefilled in chunks that sample nothing, alone: the chunk before the last is
    waited for after the last one launched; the first decode step still finds the token
    the last chunk sampled on the device (it once failed the request)."""
    prompt = list(range(1, 13))
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    sync = make_llm(llama_dir, async_scheduling=False, max_num_batched_tokens=5)
    piped = make_llm(llama_dir, async_scheduling=True, max_num_batched_tokens=5)
    want = sync.generate([prompt], params)[0]
    got = piped.generate([prompt], params)[0]
    assert got.outputs[0].finish_reason == "length" and got.token_ids == want.token_ids


def test_failed_step_leaves_no_prefix_cache_entries(llama_dir, monkeypatch):
    """Blocks are hashed when scheduled, before their KV is computed: after a forward that
    failed, the same prompt must not hit those blocks (it got wrong tokens from them)."""
    llm = make_llm(llama_dir, enable_prefix_caching=True)
    prompt = prompts(1, seed=11)[0] + list(range(1, 50))
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    want = make_llm(llama_dir, enable_prefix_caching=False).generate([prompt], params)[0]
    launch = llm.engine.runner.launch

    def failing(*args, **kwargs):
        raise RuntimeError("injected forward failure")

    monkeypatch.setattr(llm.engine.runner, "launch", failing)
    assert llm.generate([prompt], params)[0].outputs[0].finish_reason == "error"
    monkeypatch.setattr(llm.engine.runner, "launch", launch)
    again = llm.generate([prompt], params)[0]
    assert again.num_cached_tokens == 0 and again.token_ids == want.token_ids
    assert llm.generate([prompt], params)[0].num_cached_tokens > 0  # cached once computed


@pytest.mark.parametrize("overlap", [False, True])
def test_an_interrupted_step_leaves_no_prefix_cache_entries(llama_dir, monkeypatch, overlap):
    """Ctrl-C in LLM.generate lands in a forward (where the time goes): that step's blocks,
    hashed when scheduled, hold KV half written or not at all. Rerunning the same prompt must
    not hit them (it got other tokens than a fresh engine)."""
    llm = make_llm(llama_dir, async_scheduling=overlap)
    prompt = list(range(1, 50))  # 3 full blocks + 1
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    want = make_llm(llama_dir).generate([prompt], params)[0]
    launch = llm.engine.runner.launch

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(llm.engine.runner, "launch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate([prompt], params)
    monkeypatch.setattr(llm.engine.runner, "launch", launch)
    again = llm.generate([prompt], params)[0]
    assert again.num_cached_tokens == 0 and again.token_ids == want.token_ids
    assert llm.stats()["kv_blocks_used"] == 0 and not llm.engine.has_unfinished()


def test_request_ids_never_meet_inside_the_engine(llama_dir):
    """A request id reused right after an abort, while the aborted request's last step is
    still in flight, and an id that looks like another request's completion: each request
    gets its own tokens, and every block comes back."""
    ps = prompts(2, seed=9)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    want = [o.token_ids for o in make_llm(llama_dir).generate(ps, params)]

    engine = make_llm(llama_dir, async_scheduling=True, enable_prefix_caching=False).engine
    engine.add_request(ps[0], params, "x")
    for _ in range(3):
        engine.step()
    assert engine.pending is not None  # a launched step of the first "x"
    engine.abort("x")
    second = engine.add_request(ps[1], params, "x")
    while engine.has_unfinished():
        engine.step()
    assert second.final_output().token_ids == want[1]

    engine = make_llm(llama_dir).engine
    plain = engine.add_request(ps[0], params, "0_a")
    two = engine.add_request(ps[1], SamplingParams(n=2, max_tokens=8, temperature=0.0,
                                                   ignore_eos=True), "a")  # fmt: skip
    while engine.has_unfinished():
        engine.step()
    assert plain.final_output().token_ids == want[0]
    assert [c.token_ids for c in two.final_output().outputs] == [want[1], want[1]]
    assert engine.stats()["kv_blocks_used"] == 0


def test_an_idle_engine_keeps_no_finished_request_state(llama_dir):
    """The runner forgets finished requests when the engine goes idle (their token lists and
    block-table rows stayed until the next step, indefinitely on an idle server); after an
    abort too."""
    llm = make_llm(llama_dir)
    llm.generate(prompts(8, seed=5), GREEDY)
    batch = llm.engine.runner.batch
    assert batch.states == {} and not batch.block_table.any()
    engine = llm.engine
    engine.add_request([5, 17, 42, 99], GREEDY, "x")
    engine.step()
    assert len(batch.states) == 1  # (engine-internal id "x@N")
    engine.abort("x")
    assert batch.states == {} and not engine.has_unfinished()


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt"])
def test_the_last_layer_goes_on_for_sampled_rows_only(tiny_model_dirs, family, monkeypatch):
    """Past the last layer's attention (which writes every token's K/V) only the rows a step
    samples from go on through the o projection and MLP: the prefill of 3 prompts runs the
    last MLP for 3 rows, and tokens and logprobs are those of running every row."""
    batch = prompts(3, seed=5)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=3)
    runs = []
    for every_row in (False, True):
        llm = make_llm(tiny_model_dirs[family])
        if every_row:  # as when a request asks for prompt logprobs
            monkeypatch.setattr(llm.engine.runner, "_reads_every_token", lambda inputs: True)
        model = llm.engine.runner.model
        layers = model.model.decoder.layers if family == "opt" else model.model.layers
        last_mlp_in = layers[-1].fc2 if family == "opt" else layers[-1].mlp.down_proj
        rows: list[int] = []
        hook = last_mlp_in.register_forward_pre_hook(lambda m, a, rows=rows: rows.append(len(a[0])))
        runs.append((llm.generate(batch, params), rows))
        hook.remove()
    (pruned, pruned_rows), (full, full_rows) = runs
    assert pruned_rows[0] == 3 and full_rows[0] == sum(len(p) for p in batch)
    for a, b in zip(pruned, full, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            assert x.keys() == y.keys()
            assert all(abs(x[t] - y[t]) < 1e-5 for t in x)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_a_chunk_that_samples_nothing_stops_at_the_last_attention(tiny_model_dirs, family):
    """A prompt prefilled in chunks of 16 tokens: the chunks before its last sample nothing,
    so their steps write the last layer's K/V and stop there (the last MLP runs once a step
    for the one sampled row), and the tokens and logprobs are those of one whole prefill."""
    prompt = prompts(1, seed=7)[0] + prompts(1, seed=8)[0]
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=3)
    runs = []
    for budget in (16, None):
        llm = make_llm(
            tiny_model_dirs[family], **({"max_num_batched_tokens": budget} if budget else {})
        )
        model = llm.engine.runner.model
        layers = model.model.decoder.layers if family == "opt" else model.model.layers
        last_mlp_in = layers[-1].fc2 if family == "opt" else layers[-1].mlp.down_proj
        rows: list[int] = []
        hook = last_mlp_in.register_forward_pre_hook(lambda m, a, rows=rows: rows.append(len(a[0])))
        runs.append((llm.generate([prompt], params)[0].outputs[0], rows))
        hook.remove()
    (chunked, chunked_rows), (whole, whole_rows) = runs
    assert len(prompt) > 2 * 16 and chunked_rows == whole_rows == [1] * 5
    assert chunked.token_ids == whole.token_ids
    for x, y in zip(chunked.logprobs, whole.logprobs, strict=True):
        assert x.keys() == y.keys() and all(abs(x[t] - y[t]) < 1e-5 for t in x)
