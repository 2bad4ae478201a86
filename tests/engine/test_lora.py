"""Multi-LoRA on the engine (CPU, fp32, tiny random Llama): an adapter's outputs equal the
base model with the adapter merged into its weights; adapters and the base model mix in one
batch; max_loras holds adapters back without losing requests."""

import asyncio
import os

import pytest
import torch
from lora_testing import merge_adapter, write_adapter
from safetensors.torch import load_file, save_file

from vllm_runner import LLM, AsyncLLM, LoRARequest, SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2)
PROMPTS = [[5, 17, 99, 3, 250, 11], [7, 7, 8, 120, 45, 6, 300, 2, 9], [33, 21]]


@pytest.fixture(scope="module")
def adapters(llama_dir, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("loras")
    return {
        "a": write_adapter(str(root / "a"), llama_dir, rank=4, seed=1),
        "b": write_adapter(
            str(root / "b"),
            llama_dir,
            rank=8,
            seed=2,
            alpha=4.0,
            modules=("q_proj", "v_proj", "down_proj"),
        ),  # fmt: skip
        "rs": write_adapter(str(root / "rs"), llama_dir, rank=16, seed=3, use_rslora=True),
    }


@pytest.fixture(scope="module")
def lora_llm(llama_dir) -> LLM:
    return LLM(llama_dir, dtype="float32", device="cpu", num_kv_blocks=64, enable_lora=True,
               max_loras=2, max_lora_rank=16)  # fmt: skip


def _merged_outputs(llama_dir: str, adapter: str, tmp_path, prompts=PROMPTS) -> list:
    merged = merge_adapter(llama_dir, adapter, str(tmp_path / "merged"))
    base = LLM(merged, dtype="float32", device="cpu", num_kv_blocks=64)
    return base.generate(prompts, GREEDY)


def _assert_same(got: list, want: list) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        for lg, lw in zip(g.outputs[0].logprobs, w.outputs[0].logprobs, strict=True):
            assert lg.keys() == lw.keys()
            for t in lg:
                assert lg[t] == pytest.approx(lw[t], abs=1e-4)


@pytest.mark.parametrize("name", ["a", "b", "rs"])
def test_an_adapter_equals_its_merged_weights(lora_llm, llama_dir, adapters, tmp_path, name):
    lora = LoRARequest(name, {"a": 1, "b": 2, "rs": 3}[name], adapters[name])
    got = lora_llm.generate(PROMPTS, GREEDY, lora_request=lora)
    _assert_same(got, _merged_outputs(llama_dir, adapters[name], tmp_path))


def test_rslora_scales_by_the_square_root_of_the_rank(lora_llm, llama_dir, adapters, tmp_path):
    """The same weights read as plain LoRA (alpha / r) differ: the merge used alpha / sqrt(r)."""
    plain = tmp_path / "plain"
    write_adapter(str(plain), llama_dir, rank=16, seed=3, use_rslora=False)
    rs = lora_llm.generate(PROMPTS, GREEDY, lora_request=LoRARequest("rs", 3, adapters["rs"]))
    flat = lora_llm.generate(PROMPTS, GREEDY, lora_request=LoRARequest("plain", 9, str(plain)))
    assert [o.outputs[0].logprobs for o in rs] != [o.outputs[0].logprobs for o in flat]


def test_a_batch_mixing_adapters_and_the_base_model_equals_each_alone(lora_llm, adapters):
    loras = [LoRARequest("a", 1, adapters["a"]), LoRARequest("b", 2, adapters["b"]), None]
    alone = [lora_llm.generate([p], GREEDY, lora_request=lo)[0]
             for p, lo in zip(PROMPTS, loras, strict=True)]  # fmt: skip
    mixed = lora_llm.generate(PROMPTS, GREEDY, lora_request=loras)
    _assert_same(mixed, alone)
    base = lora_llm.generate(PROMPTS[:2], GREEDY)  # (the adapters do change the outputs)
    for with_lora, without in zip(mixed[:2], base, strict=True):
        assert with_lora.outputs[0].logprobs != without.outputs[0].logprobs


def test_the_base_model_of_a_lora_engine_equals_a_plain_engine(lora_llm, llama_dir):
    plain = LLM(llama_dir, dtype="float32", device="cpu", num_kv_blocks=64)
    _assert_same(lora_llm.generate(PROMPTS, GREEDY), plain.generate(PROMPTS, GREEDY))


def test_max_loras_one_runs_one_adapter_a_step_and_finishes_every_request(llama_dir, adapters):
    llm = LLM(llama_dir, dtype="float32", device="cpu", num_kv_blocks=64, enable_lora=True,
              max_loras=1, max_cpu_loras=1)  # fmt: skip
    a, b = LoRARequest("a", 1, adapters["a"]), LoRARequest("b", 2, adapters["b"])
    loras = [a, b, a, None, b, a]
    prompts = PROMPTS * 2
    want = [
        llm.generate([p], GREEDY, lora_request=lo)[0] for p, lo in zip(prompts, loras, strict=True)
    ]
    steps = []
    step = llm.engine.scheduler.schedule

    def watched():
        out = step()
        requests = llm.engine.scheduler.requests
        ids = {requests[r].lora_request.lora_int_id for r in out.num_scheduled_tokens
               if r in requests and requests[r].lora_request is not None}  # fmt: skip
        steps.append(ids)
        return out

    llm.engine.scheduler.schedule = watched
    got = llm.generate(prompts, GREEDY, lora_request=loras)
    _assert_same(got, want)
    assert max(len(s) for s in steps) == 1 and {1} in steps and {2} in steps


def test_the_prefix_cache_is_not_shared_across_adapters(lora_llm, adapters):
    """The same 40 tokens (two full blocks) under adapter a, adapter b and the base model:
    three different chains of block hashes; a request repeating one of them hits its own."""
    from vllm_runner.engine.kv_cache_manager import hash_block
    from vllm_runner.engine.request import Request

    prompt = list(range(3, 43))
    a, b = LoRARequest("a", 1, adapters["a"]), LoRARequest("b", 2, adapters["b"])
    kv = lora_llm.engine.scheduler.kv

    def hashes(lora):
        request = Request("probe", prompt, GREEDY, 1, lora_request=lora)
        kv.get_computed_blocks(request)
        return request.block_hashes

    first = hash_block(a.hash_root(), prompt[:16])
    assert hashes(a) == [first, hash_block(first, prompt[16:32])]
    assert hashes(None)[0] == hash_block(None, prompt[:16])
    assert len({hashes(a)[0], hashes(b)[0], hashes(None)[0]}) == 3
    one = SamplingParams(max_tokens=1, temperature=0.0)
    lora_llm.generate([prompt], one, lora_request=a)
    cached = lora_llm.generate([prompt], one, lora_request=a)[0].num_cached_tokens
    other = lora_llm.generate([prompt], one, lora_request=b)[0].num_cached_tokens
    base = lora_llm.generate([prompt], one)[0].num_cached_tokens
    assert (cached, other, base) == (32, 0, 0)


def _bad(tmp_path, llama_dir, **config) -> str:
    return write_adapter(str(tmp_path / "bad"), llama_dir, **config)


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(rank=32), "has rank 32, more than max_lora_rank 16: start the engine with"),
        (dict(rank=32, r=8), "has rank 32 (model.layers.0.mlp.down_proj), more than max_lora"),
        (dict(use_dora=True), "is a DoRA adapter (use_dora: true)"),
        (dict(modules_to_save=["lm_head"]), "trains whole modules (modules_to_save: ['lm_head'])"),
        (dict(target_modules=["q_proj", "lm_head"]), "targets 'lm_head': LoRA on the embedding"),
        (dict(target_modules=["q_proj", "fc1"]), "targets module 'fc1', which this model does"),
    ],
)
def test_an_adapter_the_engine_cannot_run_is_refused(lora_llm, llama_dir, tmp_path, config,
                                                     message):  # fmt: skip
    lora = LoRARequest("bad", 40, _bad(tmp_path, llama_dir, **config))
    with pytest.raises(ValueError, match="LoRA adapter 'bad' ") as error:
        lora_llm.generate(PROMPTS, GREEDY, lora_request=lora)
    assert message in str(error.value)
    assert lora_llm.engine.states == {}  # (none of the batch was added)


def test_lora_errors_name_the_value(lora_llm, llama_dir, adapters, tmp_path):
    with pytest.raises(ValueError, match="lora_path '/nowhere' is not a folder"):
        lora_llm.generate(PROMPTS, GREEDY, lora_request=LoRARequest("x", 5, "/nowhere"))
    with pytest.raises(ValueError, match="lora_int_id must be an integer >= 1"):
        LoRARequest("x", 0, adapters["a"])
    with pytest.raises(ValueError, match="got 2 lora_requests for 3 prompts"):
        lora_llm.generate(PROMPTS, GREEDY, lora_request=[None, None])
    lora_llm.generate(PROMPTS[:1], GREEDY, lora_request=LoRARequest("a", 1, adapters["a"]))
    with pytest.raises(ValueError, match="lora_int_id 1 is adapter 'a'"):
        lora_llm.generate(PROMPTS[:1], GREEDY, lora_request=LoRARequest("b", 1, adapters["b"]))
    plain = LLM(llama_dir, dtype="float32", device="cpu", num_kv_blocks=8)
    with pytest.raises(ValueError, match="lora_request 'a' needs an engine started with "
                       "enable_lora=True"):  # fmt: skip
        plain.generate(PROMPTS, GREEDY, lora_request=LoRARequest("a", 1, adapters["a"]))
    emb = write_adapter(str(tmp_path / "emb"), llama_dir, modules=("q_proj",))
    file = os.path.join(emb, "adapter_model.safetensors")
    tensors = load_file(file)
    tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(4, 384)
    save_file(tensors, file)
    with pytest.raises(ValueError, match="LoRA on the embedding or lm_head layers is not"):
        lora_llm.generate(PROMPTS, GREEDY, lora_request=LoRARequest("emb", 6, emb))


def test_a_preempted_request_recomputes_with_its_adapter(lora_llm, llama_dir, adapters):
    a, b = LoRARequest("a", 1, adapters["a"]), LoRARequest("b", 2, adapters["b"])
    prompts = [list(range(5 + i, 45 + i)) for i in range(3)]  # 40 tokens, + 24 new each
    loras = [a, b, None]
    long = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=2)
    want = lora_llm.generate(prompts, long, lora_request=loras)
    small = LLM(llama_dir, dtype="float32", device="cpu", num_kv_blocks=9, enable_lora=True,
                max_loras=2, enable_prefix_caching=False)  # fmt: skip
    _assert_same(small.generate(prompts, long, lora_request=loras), want)
    assert small.stats()["num_preemptions"] > 0


def test_an_engine_process_runs_each_streams_adapter(lora_llm, llama_dir, adapters):
    """AsyncLLM sends the adapter with the request (pickled to its engine process)."""
    a, b = LoRARequest("a", 1, adapters["a"]), LoRARequest("b", 2, adapters["b"])
    want = lora_llm.generate(PROMPTS, GREEDY, lora_request=[a, b, None])

    async def run() -> tuple[list, list]:
        llm = AsyncLLM(llama_dir, dtype="float32", device="cpu", num_kv_blocks=64,
                       engine_process=True, enable_lora=True, max_loras=2)  # fmt: skip
        try:
            outs = await llm.generate(PROMPTS, GREEDY, lora_request=[a, b, None])
            streamed = [o async for o in llm.stream(PROMPTS[1], GREEDY, lora_request=b)]
        finally:
            await llm.shutdown()
        return outs, streamed

    got, streamed = asyncio.run(run())
    _assert_same(got, want)
    assert [t for o in streamed for t in o.new_token_ids] == want[1].outputs[0].token_ids


def test_piecewise_pieces_pad_their_tokens_with_no_adapter(lora_llm, llama_dir, adapters):
    """Prefill steps run as padded pieces (eagerly on the CPU): pad tokens read slot -1."""
    a, b = LoRARequest("a", 1, adapters["a"]), LoRARequest("b", 2, adapters["b"])
    pieces = LLM(llama_dir, dtype="float32", device="cpu", num_kv_blocks=64, enable_lora=True,
                 max_loras=2, max_num_batched_tokens=64, piecewise_max_tokens=64)  # fmt: skip
    assert pieces.engine.runner.pieces is not None
    loras = [a, None, b]
    _assert_same(pieces.generate(PROMPTS, GREEDY, lora_request=loras),
                 lora_llm.generate(PROMPTS, GREEDY, lora_request=loras))  # fmt: skip
