"""Embeddings (LLM.embed, AsyncLLM.embed): parity with HF transformers' AutoModel for each
pooling type, and the engine path: chunked prefill, prefix caching, preemption, batches
shared with generating requests, blocks freed."""

import asyncio
import re

import pytest
import torch
import torch.nn.functional as F
from engine_testing import GREEDY, make_llm, prompts

from vllm_runner import AsyncLLM, PoolingParams, RequestError, SamplingParams

POOLINGS = ("LAST", "MEAN", "CLS")
RAW = PoolingParams(normalize=False)
# fp32 on CPU: the engine's forward and HF's differ by rounding only
TIGHT = {"rtol": 1e-5, "atol": 1e-5}


def hf_hidden(path: str, ids: list[int]) -> torch.Tensor:
    """HF's final (normed) hidden states of ``ids``: [len(ids), hidden]."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).last_hidden_state[0]


def pooled(hidden: torch.Tensor, kind: str) -> torch.Tensor:
    return {"LAST": hidden[-1], "MEAN": hidden.mean(dim=0), "CLS": hidden[0]}[kind]


def vector(out) -> torch.Tensor:
    return torch.tensor(out.outputs.embedding)


def embed_llm(path: str, kind: str, **kw):
    return make_llm(path, pooler_config={"pooling_type": kind}, **kw)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("kind", POOLINGS)
def test_embeddings_equal_hf_pooled_hidden_states(tiny_model_dirs, family, kind):
    path = tiny_model_dirs[family]
    batch = prompts(3, seed=31)
    llm = embed_llm(path, kind)
    normed = llm.embed(batch)  # pooler_config's normalize: True
    raw = llm.embed(batch, RAW)
    for ids, n, r in zip(batch, normed, raw, strict=True):
        want = pooled(hf_hidden(path, ids), kind)
        torch.testing.assert_close(vector(r), want, **TIGHT)
        torch.testing.assert_close(vector(n), F.normalize(want, dim=-1), **TIGHT)
        assert n.prompt_token_ids == ids and n.finished
        assert n.outputs.hidden_size == 64
    assert normed[0].request_id != normed[1].request_id
    stats = llm.stats()
    assert stats["kv_blocks_used"] == stats["num_running"] == stats["generation_tokens_total"] == 0
    assert stats["prompt_tokens_total"] == 2 * sum(map(len, batch))


def test_the_engine_default_is_last_token_normalised_and_may_be_turned_off(llama_dir):
    ids = prompts(1, seed=32)[0]
    want = pooled(hf_hidden(llama_dir, ids), "LAST")
    out = make_llm(llama_dir).embed(ids)[0]
    torch.testing.assert_close(vector(out), F.normalize(want, dim=-1), **TIGHT)
    raw = make_llm(llama_dir, pooler_config='{"normalize": false}').embed(ids)[0]
    torch.testing.assert_close(vector(raw), want, **TIGHT)
    # a request's own normalize wins over the engine's
    again = make_llm(llama_dir, pooler_config={"normalize": False})
    assert again.embed(ids, PoolingParams(normalize=True))[0].outputs.embedding == (
        out.outputs.embedding
    )


@pytest.mark.parametrize("kind", POOLINGS)
def test_chunked_prefill_gives_the_unchunked_vector(llama_dir, kind):
    """A 7-token step budget cuts each prompt into chunks (MEAN sums them across steps; CLS
    takes its first, LAST its last chunk), also under async scheduling."""
    batch = [list(range(5, 45)), list(range(100, 113)), [9]]
    whole = embed_llm(llama_dir, kind).embed(batch, RAW)
    for overlap in (False, True):
        chunked = embed_llm(llama_dir, kind, max_num_batched_tokens=7, async_scheduling=overlap)
        for a, b in zip(whole, chunked.embed(batch, RAW), strict=True):
            torch.testing.assert_close(vector(b), vector(a), **TIGHT)
        assert chunked.stats()["kv_blocks_used"] == 0


@pytest.mark.parametrize("kind", POOLINGS)
def test_piecewise_pieces_pool_only_the_steps_own_rows(llama_dir, kind):
    """Steps run as piecewise pieces (eagerly on the CPU) give hidden states padded to the
    piece's token count: the pad rows are never pooled."""
    batch = prompts(5, seed=37)
    plain = embed_llm(llama_dir, kind).embed(batch, RAW)
    pieces = embed_llm(llama_dir, kind, piecewise_max_tokens=64, max_num_batched_tokens=40)
    assert pieces.engine.runner.pieces is not None
    for a, b in zip(plain, pieces.embed(batch, RAW), strict=True):
        torch.testing.assert_close(vector(b), vector(a), **TIGHT)


def test_a_last_token_embedding_reads_the_prefix_cache(llama_dir):
    block = 16
    shared = prompts(1, seed=33)[0][:5] * 10  # 3 full blocks shared
    first, second = shared[: 3 * block] + [1, 2], shared[: 3 * block] + [7, 8, 9]
    llm = embed_llm(llama_dir, "LAST")
    llm.embed(first)
    out = llm.embed(second, RAW)[0]
    assert out.num_cached_tokens == 3 * block
    assert llm.stats()["prefix_cache_hits"] == 3 * block
    cold = embed_llm(llama_dir, "LAST", enable_prefix_caching=False).embed(second, RAW)[0]
    torch.testing.assert_close(vector(out), vector(cold), **TIGHT)
    # an embedding's full blocks serve a later generating request's prompt too
    llm.generate([second[: 3 * block] + [4]], GREEDY)
    assert llm.stats()["prefix_cache_hits"] == 2 * 3 * block


@pytest.mark.parametrize("kind", ["MEAN", "CLS"])
def test_mean_and_cls_embeddings_compute_every_prompt_token(llama_dir, kind):
    """They read positions a cache hit would skip: no hit, and not counted as a lookup."""
    ids = list(range(20, 70))
    llm = embed_llm(llama_dir, kind)
    llm.generate([ids], GREEDY)  # caches the prompt's 3 full blocks
    before = llm.stats()
    out = llm.embed(ids, RAW)[0]
    after = llm.stats()
    assert out.num_cached_tokens == 0
    assert after["prefix_cache_hits"] == before["prefix_cache_hits"]
    assert after["prefix_cache_queries"] == before["prefix_cache_queries"]
    torch.testing.assert_close(vector(out), pooled(hf_hidden(llama_dir, ids), kind), **TIGHT)


def run_mixed(llm, gen_prompts: list, emb_prompts: list, pooling: PoolingParams):
    """Generation and embedding requests added together, stepped to the end; returns
    (token ids, vectors, whether some step ran both kinds)."""
    engine = llm.engine
    launch = engine.runner.launch
    mixed = []

    def spy(sched, overlap):
        kinds = {engine.scheduler.requests[r].pooling is None for r in sched.num_scheduled_tokens}
        mixed.append(kinds == {True, False})
        return launch(sched, overlap)

    engine.runner.launch = spy
    gens, embs = [], []
    for i, (g, e) in enumerate(zip(gen_prompts, emb_prompts, strict=True)):
        gens.append(engine.add_request(g, GREEDY, request_id=f"g{i}"))
        embs.append(engine.add_request(e, pooling, request_id=f"e{i}"))
    while engine.has_unfinished():
        engine.step(stream=False)
    engine.pop_finished()
    engine.runner.launch = launch
    tokens = [s.final_output().token_ids for s in gens]
    return tokens, [vector(s.final_output()) for s in embs], any(mixed)


@pytest.mark.parametrize("overlap", [False, True])
def test_a_shared_batch_leaves_greedy_tokens_and_vectors_unchanged(llama_dir, overlap):
    """Embedding (MEAN: every row kept past the last attention) and generating requests in
    the same steps, chunked, under preemption (a 12-block cache) too."""
    gen, emb = prompts(6, seed=34), prompts(6, seed=35)
    alone_tokens = [o.token_ids for o in make_llm(llama_dir).generate(gen, GREEDY)]
    alone_vectors = [vector(o) for o in embed_llm(llama_dir, "MEAN").embed(emb, RAW)]
    for kw in ({"max_num_batched_tokens": 24}, {"num_kv_blocks": 12}):
        llm = embed_llm(llama_dir, "MEAN", async_scheduling=overlap,
                        enable_prefix_caching=False, **kw)  # fmt: skip
        tokens, vectors, mixed = run_mixed(llm, gen, emb, RAW)
        assert mixed and tokens == alone_tokens
        for got, want in zip(vectors, alone_vectors, strict=True):
            torch.testing.assert_close(got, want, **TIGHT)
        stats = llm.stats()
        assert stats["kv_blocks_used"] == stats["num_running"] == stats["num_waiting"] == 0
        assert stats["generation_tokens_total"] == 6 * GREEDY.max_tokens
        if "num_kv_blocks" in kw:
            assert stats["num_preemptions"] > 0
        assert not llm.engine.runner.batch.states and not llm.engine.runner.batch.pooling_ids


def test_an_embedding_aborted_mid_prompt_frees_its_blocks(llama_dir):
    llm = embed_llm(llama_dir, "MEAN", max_num_batched_tokens=16)
    state = llm.engine.add_request(list(range(1, 60)), PoolingParams(), request_id="e")
    llm.engine.step()
    assert llm.stats()["kv_blocks_used"] == 1
    llm.engine.abort("e")
    assert llm.stats()["kv_blocks_used"] == 0 and not llm.engine.has_unfinished()
    assert not llm.engine.runner.batch.pooling_ids
    assert state.final_output().outputs.embedding == []


def test_a_failed_step_fails_its_embeddings_and_the_engine_serves_on(llama_dir, monkeypatch):
    llm = embed_llm(llama_dir, "MEAN", max_num_batched_tokens=16)
    launch = llm.engine.runner.launch
    calls = []

    def failing_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected forward failure")
        return launch(*args, **kwargs)

    monkeypatch.setattr(llm.engine.runner, "launch", failing_second)
    ids = list(range(1, 40))
    failure = "request req-0 failed: engine step failed: RuntimeError('injected forward failure')"
    with pytest.raises(RequestError, match=f"^{re.escape(failure)}$") as error:
        llm.embed(ids)
    assert [o.outputs.embedding for o in error.value.results] == [[]]
    monkeypatch.setattr(llm.engine.runner, "launch", launch)
    assert llm.stats()["kv_blocks_used"] == 0 and not llm.engine.runner.batch.pooling_ids
    again = llm.embed(ids)[0]  # (the failed request's blocks left the prefix cache)
    torch.testing.assert_close(vector(again), vector(embed_llm(llama_dir, "MEAN").embed(ids)[0]),
                               **TIGHT)  # fmt: skip


def test_prompt_lengths_and_dimensions(llama_dir):
    llm = make_llm(llama_dir, max_model_len=32)
    full = llm.embed(list(range(1, 33)))[0]  # max_model_len tokens: nothing is generated
    assert full.outputs.hidden_size == 64 and len(full.prompt_token_ids) == 32
    with pytest.raises(ValueError, match=r"prompt has 33 tokens, but max_model_len is 32 \(an "
                       r"embedding's prompt may have that many at most\)"):  # fmt: skip
        llm.embed(list(range(1, 34)))
    with pytest.raises(ValueError, match=r"prompt is empty: it has 0 tokens"):
        llm.embed([[]])
    cut = llm.embed(list(range(1, 50)), truncate_prompt_tokens=10)[0]
    assert cut.prompt_token_ids == list(range(40, 50))
    assert cut.outputs.embedding == llm.embed(list(range(40, 50)))[0].outputs.embedding
    assert llm.embed([5, 6], PoolingParams(dimensions=64))[0].outputs.hidden_size == 64
    with pytest.raises(ValueError, match=r"dimensions 32 is not supported: this model's "
                       r"embeddings have 64 .* give 64"):  # fmt: skip
        llm.embed([5, 6], PoolingParams(dimensions=32))
    with pytest.raises(ValueError, match="prompt token id 384 is outside the vocabulary"):
        llm.embed([5, 384])
    with pytest.raises(ValueError, match="pooling_params must be a PoolingParams or a list of "
                       "them \\(one per prompt\\), got SamplingParams"):  # fmt: skip
        llm.embed([5, 6], SamplingParams())
    with pytest.raises(ValueError, match="got 1 PoolingParams for 2 prompts"):
        llm.embed([[5, 6], [7]], [PoolingParams()])
    assert llm.stats()["kv_blocks_used"] == 0


def test_bad_pooling_settings_name_the_value():
    from vllm_runner import EngineArgs, PoolerConfig

    cases = [
        ({"pooling_type": "max"}, "pooler_config pooling_type must be one of ('LAST', 'MEAN', "
                                  "'CLS') (any case), got 'max'"),
        ({"pooling": "MEAN"}, "pooler_config key(s) ['pooling'] are not supported; known: "
                              "['normalize', 'pooling_type']"),
        ('{"normalize": 1}', "pooler_config normalize must be true or false, got 1"),
        ("MEAN", "pooler_config is not valid JSON"),
        (3, "pooler_config must be a PoolerConfig, a dict or its JSON text, got 3"),
    ]  # fmt: skip
    for value, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            EngineArgs(pooler_config=value).validate()
    assert PoolerConfig.of({"pooling_type": "mean"}) == PoolerConfig("MEAN", True)
    for kw, message in [
        ({"dimensions": 0}, "dimensions must be an integer >= 1, got 0"),
        ({"normalize": "yes"}, "normalize must be true, false or None, got 'yes'"),
        ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens must be -1 or an integer >= 1"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            PoolingParams(**kw)


def test_async_embed_shares_steps_with_streams_and_frees_blocks(llama_dir):
    ids = prompts(4, seed=36)
    want = [vector(o) for o in make_llm(llama_dir).embed(ids)]
    gen_want = make_llm(llama_dir).generate(ids, GREEDY)

    async def main():
        async with AsyncLLM(llama_dir, dtype="float32", device="cpu", cpu_kv_cache_gb=0.05,
                            max_num_batched_tokens=24) as llm:  # fmt: skip
            jobs = [llm.embed(p, request_id=f"emb-{i}") for i, p in enumerate(ids)]
            gens = llm.generate(ids, GREEDY)
            *embs, outs = await asyncio.gather(*jobs, gens)
            return embs, outs, llm.stats()

    embs, outs, stats = asyncio.run(main())
    assert [e.request_id for e in embs] == [f"emb-{i}" for i in range(4)]
    for got, expected in zip(embs, want, strict=True):
        torch.testing.assert_close(vector(got), expected, **TIGHT)
    assert [o.token_ids for o in outs] == [o.token_ids for o in gen_want]
    assert stats["kv_blocks_used"] == 0
