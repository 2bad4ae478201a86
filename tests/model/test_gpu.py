"""GPU end-to-end checks (run on the device machine: pytest -m gpu)."""

import gc
import random
import weakref

import pytest
import torch

from vllm_runner import LLM, SamplingParams

pytestmark = pytest.mark.gpu
NUM_NEW = 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A random model of SmolLM2-135M's shape (the device machine cannot install the real one)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if not torch.cuda.is_available():
        pytest.fail("the gpu suite needs a CUDA device")
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        rope_theta=100000.0,
        architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():  # peaked logits (a large tied embedding), so greedy is not a coin toss
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 1.0 if "embed" in name else 0.05)
    path = str(tmp_path_factory.mktemp("smol_shape"))
    model.save_pretrained(path)
    return path


def gpu_llm(path: str, **kw) -> LLM:
    kw.setdefault("gpu_memory_utilization", 0.3)
    kw.setdefault("dtype", "bfloat16")
    return LLM(path, device="cuda", max_model_len=2048, **kw)


@pytest.fixture(scope="module")
def smol_gpu(model_dir):
    return gpu_llm(model_dir)


def prompts() -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(49152) for _ in range(rng.randint(2, 300))] for _ in range(12)]


def test_bf16_greedy_close_to_hf(smol_gpu, model_dir):
    """Same weights, bf16 on both sides: where tokens first differ, each side's token must be
    among the other's top-5 (bf16 rounding may flip near-ties)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    batch = prompts()
    outs = smol_gpu.generate(
        batch, SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True, logprobs=5)
    )
    for prompt, out in zip(batch, outs, strict=True):
        first_difference_in_top5(hf, prompt, out)


def test_cuda_graphs_match_eager(model_dir):
    """Fresh engines on both sides (a warm prefix cache would change what prefill computes).
    Every graph writes its logits into the first rows of one shared output; requests that
    end at different steps make consecutive steps replay graphs of different sizes."""
    graphs = gpu_llm(model_dir, gpu_memory_utilization=0.2)
    decode = graphs.engine.runner.graphs
    assert len(decode.graphs) == len(decode.logits) == len(decode.buckets)  # all captured
    assert len({t.untyped_storage().data_ptr() for t in decode.logits.values()}) == 1
    eager = gpu_llm(model_dir, gpu_memory_utilization=0.2, enforce_eager=True)
    assert not eager.engine.runner.graphs.graphs  # same padded decode calls, run eagerly
    batch = prompts()
    params = [SamplingParams(max_tokens=NUM_NEW - 3 * (i % 4), temperature=0.0, ignore_eos=True)
              for i in range(len(batch))]  # fmt: skip
    assert [o.token_ids for o in graphs.generate(batch, params)] == [
        o.token_ids for o in eager.generate(batch, params)
    ]


@pytest.mark.parametrize(("quantization", "budget"), [(None, None), ("int8", None), (None, 64)])
def test_the_last_layer_for_sampled_rows_matches_every_row(
    model_dir, monkeypatch, quantization, budget
):
    """Past the last attention only the sampled rows go on (eager prefill steps; a lone
    prompt takes one row through the o projection and MLP; with a 64-token budget, chunks
    that sample nothing stop at the last attention): greedy tokens as when every row goes
    on, or where they first differ each is in the other's top-5."""
    batch = prompts()[:6]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=5)
    kw = {"max_num_batched_tokens": budget} if budget else {}
    runs = []
    for every_row in (False, True):
        llm = gpu_llm(model_dir, gpu_memory_utilization=0.15, quantization=quantization, **kw)
        if every_row:  # as when a request reads prompt logprobs (no decode graphs either)
            monkeypatch.setattr(llm.engine.runner, "_reads_every_token", lambda inputs: True)
        runs.append(llm.generate(batch, params) + llm.generate(batch[:1], params))
        del llm
    for a, b in zip(*runs, strict=True):
        ta, tb = a.outputs[0].token_ids, b.outputs[0].token_ids
        i = next((j for j, (x, y) in enumerate(zip(ta, tb, strict=True)) if x != y), None)
        if i is not None:
            assert ta[i] in b.outputs[0].logprobs[i] and tb[i] in a.outputs[0].logprobs[i]


@pytest.mark.parametrize("quantization", [None, "int8", "fp8"])
def test_piecewise_graphs_match_their_eager_pieces(model_dir, quantization):
    """Steps that prefill (a 256-token budget: prompts chunked beside decoding requests) in
    captured piecewise graphs give the tokens of the same padded pieces run eagerly, and stay
    close to HF (top-5 criterion; bf16 weights only). Quantized layers too: a served engine
    takes pieces by default, whatever its weights."""
    from transformers import AutoModelForCausalLM

    kw = dict(gpu_memory_utilization=0.2, max_num_batched_tokens=256, piecewise_max_tokens=256,
              quantization=quantization)  # fmt: skip
    graphs = gpu_llm(model_dir, **kw)
    assert len(graphs.engine.runner.pieces.graphs) == 4  # 64, 128, 192, 256 tokens
    eager = gpu_llm(model_dir, enforce_eager=True, **kw)
    assert not eager.engine.runner.pieces.graphs
    params = SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True, logprobs=5)
    batch = prompts()
    outs = graphs.generate(batch, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in eager.generate(batch, params)]
    if quantization:
        return
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    for prompt, out in zip(batch, outs, strict=True):
        first_difference_in_top5(hf, prompt, out)


@pytest.mark.parametrize("piecewise_max_tokens", [0, 256])
def test_a_dropped_engine_frees_its_device_memory(model_dir, piecewise_max_tokens):
    """`del llm` gives the engine's device memory back at once, piecewise graphs or not (no
    reference cycle left for the collector): tests and notebooks build engine after engine
    in one process. (With pieces on in every engine, the tests after this one once ran out
    of memory.) The allowance covers what the process keeps once (cuBLAS workspaces)."""
    gc.collect()
    before = torch.cuda.memory_allocated()
    llm = gpu_llm(model_dir, gpu_memory_utilization=0.2, max_num_batched_tokens=256,
                  piecewise_max_tokens=piecewise_max_tokens)  # fmt: skip
    llm.generate(prompts()[:4], SamplingParams(max_tokens=8, ignore_eos=True))
    engine = weakref.ref(llm.engine)
    del llm
    alive = engine()
    assert alive is None, sorted(type(r).__name__ for r in gc.get_referrers(alive))
    assert torch.cuda.memory_allocated() - before < 64 * 2**20


@pytest.mark.parametrize("piecewise_max_tokens", [0, 2048])
def test_an_engine_keeps_to_its_memory_share(model_dir, piecewise_max_tokens):
    """Weights, KV cache, both kinds of graphs (the decode graphs' outputs: 4,231 rows of
    logits, counted before they exist) and what the allocator caches: within
    ``gpu_memory_utilization`` of the card once the engine is built."""
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()
    llm = gpu_llm(model_dir, gpu_memory_utilization=0.2,
                  piecewise_max_tokens=piecewise_max_tokens)  # fmt: skip
    grown = torch.cuda.memory_reserved() - before
    assert grown <= 0.2 * torch.cuda.get_device_properties(0).total_memory
    assert llm.engine.runner.graphs.graphs  # captured


def test_piecewise_pool_measured_after_a_dropped_engine(model_dir):
    """A dropped engine's memory stays in torch's cache (reserved, not freed): the next
    engine's piecewise pool must not count its release as the pool shrinking (it once read
    as minus the dropped KV cache, and the engine then sized its cache past its share)."""
    first = gpu_llm(model_dir, gpu_memory_utilization=0.2)
    del first
    assert torch.cuda.memory_reserved() > torch.cuda.memory_allocated() + 2**30  # cached
    llm = gpu_llm(model_dir, gpu_memory_utilization=0.2, max_num_batched_tokens=256,
                  piecewise_max_tokens=256)  # fmt: skip
    runner = llm.engine.runner
    assert 0 < runner._pieces_pool_bytes < 2**30
    assert runner.kv_cache_bytes <= 0.2 * torch.cuda.get_device_properties(0).total_memory


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_pdl_matches_plain_launches(model_dir, monkeypatch, quantization):
    """Programmatic dependent launch changes when kernels start, never what they compute:
    identical tokens with it off (VLLM_RUNNER_PDL=0), in CUDA graphs, for a batch and for a
    lone request (int8: the one-row GEMV, which reads weights before its in-kernel wait)."""
    params = SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)
    batch = prompts()
    outputs = []
    for pdl in ("1", "0"):
        monkeypatch.setenv("VLLM_RUNNER_PDL", pdl)
        llm = gpu_llm(model_dir, gpu_memory_utilization=0.2, quantization=quantization)
        outputs.append([o.token_ids for o in llm.generate(batch, params)])
        outputs[-1] += [o.token_ids for o in llm.generate(batch[:1], params)]
        del llm
    assert outputs[0] == outputs[1]


def first_difference_in_top5(hf, prompt: list[int], out) -> None:
    """Greedy tokens equal HF's, or where they first differ each is in the other's top-5."""
    ids = torch.tensor([prompt], device="cuda")
    with torch.no_grad():
        hf_out = hf.generate(
            ids,
            max_new_tokens=NUM_NEW,
            do_sample=False,
            eos_token_id=-1,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    hf_ids = hf_out.sequences[0, ids.shape[1] :].tolist()
    if hf_ids == out.token_ids:
        return
    i = next(j for j, (a, b) in enumerate(zip(hf_ids, out.token_ids, strict=True)) if a != b)
    assert out.token_ids[i] in hf_out.logits[i][0].topk(5).indices.tolist()
    assert hf_ids[i] in out.outputs[0].logprobs[i]


def test_lone_request_fused_layers(model_dir, monkeypatch):
    """A request decoding alone runs each layer as GEMVs with the norms, residual adds and
    SiLU inside (kernels/gemv.py): close to HF (top-5 criterion), identical in CUDA graphs
    and eagerly, and the fused path is really taken."""
    from transformers import AutoModelForCausalLM

    import kernels.gemv

    calls = []
    fused = kernels.gemv.linear_one_row

    def spy(*args, **kw):
        calls.append(
            (kw.get("norm") is not None, kw.get("residual") is not None, kw.get("gated", False))
        )
        return fused(*args, **kw)

    monkeypatch.setattr(kernels.gemv, "linear_one_row", spy)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    params = SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True, logprobs=5)
    graphs = gpu_llm(model_dir, gpu_memory_utilization=0.2)
    eager = gpu_llm(model_dir, gpu_memory_utilization=0.2, enforce_eager=True)
    for prompt in prompts()[:4]:
        calls.clear()
        (out,) = eager.generate([prompt], params)
        # 30 layers x 4 GEMVs per decode step (qkv and gate_up norm, o and down add) + LM head
        assert len(calls) >= (30 * 4 + 1) * (NUM_NEW - 1), len(calls)
        assert set(calls) == {(True, False, False), (False, True, False), (True, False, True),
                              (False, False, False)}  # fmt: skip
        assert graphs.generate([prompt], params)[0].token_ids == out.token_ids
        first_difference_in_top5(hf, prompt, out)


@pytest.mark.parametrize("quantization", ["int8", "fp8"])
def test_quantized_lone_request_fused_layers(model_dir, monkeypatch, quantization):
    """int8 / fp8: the fused one-row layers (norms and adds inside the W8A16 GEMV) vs the
    unfused ones (VLLM_RUNNER_GEMV=0): equal tokens, or where they first differ each side's
    token is in the other's top-5 (the fused norm keeps its input in fp32)."""
    from vllm_runner.model.layers.quant import QuantMethod

    fusions = []
    apply_one_row = QuantMethod.apply_one_row

    def spy(self, layer, x, bias, **kw):
        fusions.append((kw["norm"] is not None, kw["residual"] is not None))
        return apply_one_row(self, layer, x, bias, **kw)

    monkeypatch.setattr(QuantMethod, "apply_one_row", spy)
    params = SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True, logprobs=5)
    outs = []
    for gemv in ("1", "0"):
        monkeypatch.setenv("VLLM_RUNNER_GEMV", gemv)
        fusions.clear()
        llm = gpu_llm(model_dir, gpu_memory_utilization=0.2, quantization=quantization)
        outs.append([llm.generate([p], params)[0] for p in prompts()[:4]])
        # the fused layers ran (norms into qkv / gate_up, adds into o / down) only with GEMV on
        assert set(fusions) == ({(True, False), (False, True)} if gemv == "1" else set())
        del llm
    for fused, plain in zip(*outs, strict=True):
        if fused.token_ids == plain.token_ids:
            continue
        pairs = zip(fused.token_ids, plain.token_ids, strict=True)
        i = next(j for j, (a, b) in enumerate(pairs) if a != b)
        assert fused.token_ids[i] in plain.outputs[0].logprobs[i]
        assert plain.token_ids[i] in fused.outputs[0].logprobs[i]


def test_fp8_kv_cache(model_dir, tmp_path, peaked_llama):
    """kv_cache_dtype="fp8": half the bytes per cached token of bf16; CUDA graphs == eager
    (a batch, and a lone request: the fused decode kernel rotates, rounds to e4m3, writes and
    attends). The kernels against the torch reference on CPU, end to end: an fp32 model
    over an fp8 cache gives the same greedy tokens on both (the same e4m3 roundings)."""
    params = SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)
    batch = prompts()
    bf16 = gpu_llm(model_dir, gpu_memory_utilization=0.15)
    fp8 = gpu_llm(model_dir, gpu_memory_utilization=0.15, kv_cache_dtype="fp8")
    eager = gpu_llm(model_dir, gpu_memory_utilization=0.15, kv_cache_dtype="fp8",
                    enforce_eager=True)  # fmt: skip
    assert fp8.engine.runner.attn_layers[0].k_cache.dtype == torch.float8_e4m3fn
    per_block = [e.stats()["kv_cache_bytes"] / e.engine.runner.num_blocks for e in (bf16, fp8)]
    assert per_block[0] == 2 * per_block[1]
    outs = [o.token_ids for o in fp8.generate(batch, params)]
    assert [o.token_ids for o in eager.generate(batch, params)] == outs
    lone = [e.generate(batch[:1], params)[0].token_ids for e in (fp8, eager)]
    assert lone[0] == lone[1]
    del bf16, fp8, eager

    peaked_llama(
        str(tmp_path), ("embed",), vocab_size=4096, hidden_size=256, intermediate_size=512,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024,
    )  # fmt: skip
    small = [[t % 4096 for t in p[:200]] for p in batch[:8]]
    tokens = [
        [o.token_ids for o in LLM(str(tmp_path), dtype="float32", device=device,
                                  kv_cache_dtype="fp8", num_kv_blocks=256).generate(small, params)]
        for device in ("cuda", "cpu")
    ]  # fmt: skip
    assert tokens[0] == tokens[1]


def test_yarn_rope_on_the_gpu_matches_the_cpu(tmp_path, peaked_llama):
    """A YaRN-scaled model (its cos / sin tables carry the attention factor) through the
    GPU kernels (prefill, the batched decode, a lone request's fused layers) gives the
    greedy tokens of the CPU reference path, fp32 on both, past the original context."""
    peaked_llama(
        str(tmp_path), ("embed",), vocab_size=4096, hidden_size=256, intermediate_size=512,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 256},
    )  # fmt: skip
    params = SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)
    batch = [[t % 4096 for t in p] for p in prompts()[:8]]
    batch = [p * (1 + 300 // len(p)) for p in batch]  # past the 256 original positions
    tokens = [
        [o.token_ids for o in LLM(str(tmp_path), dtype="float32", device=device,
                                  num_kv_blocks=512).generate(b, params)]
        for device in ("cuda", "cpu") for b in (batch, batch[:1])
    ]  # fmt: skip
    assert tokens[:2] == tokens[2:]


def test_gpu_preemption(model_dir):
    """fp32, so that recomputing a preempted request's KV (one prefill) gives the same values
    as computing them step by step; in bf16 the two orders round differently."""
    small = gpu_llm(model_dir, dtype="float32", num_kv_blocks=40)
    big = gpu_llm(model_dir, dtype="float32")
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    batch = prompts()
    assert [o.token_ids for o in small.generate(batch, params)] == [
        o.token_ids for o in big.generate(batch, params)
    ]
    assert small.stats()["num_preemptions"] > 0 and small.stats()["kv_blocks_used"] == 0


def test_host_side_sampling_features_match_the_cpu_engine(model_dir):
    """fp32 on both: penalties (all rows at once), logit_bias and top-k prompt logprobs on
    the GPU give the CPU engine's tokens and values (what each does: tests/engine)."""
    cpu = LLM(model_dir, device="cpu", dtype="float32", max_model_len=2048, cpu_kv_cache_gb=0.5)
    gpu = gpu_llm(model_dir, dtype="float32")
    batch = prompts()[:6]
    params = [
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, repetition_penalty=1.3),
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, frequency_penalty=0.8,
                       presence_penalty=0.5),
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                       logit_bias={17: 100.0, 23: -100.0}),
        SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, prompt_logprobs=3),
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, repetition_penalty=0.9,
                       frequency_penalty=-0.5),
    ]  # fmt: skip
    want, got = cpu.generate(batch, params), gpu.generate(batch, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    for a, b in zip(got[4].prompt_logprobs[1:], want[4].prompt_logprobs[1:], strict=True):
        assert a.keys() == b.keys()
        assert all(abs(a[t] - b[t]) < 1e-3 for t in a)


def test_overlapped_logprobs_match_synchronous_steps(model_dir):
    """On the device, logprobs of overlapped steps (copied to pinned memory with the sampled
    ids, read a step later) equal those of synchronous steps: decode graphs, seeded rows."""
    batch = prompts()
    params = [SamplingParams(max_tokens=NUM_NEW, ignore_eos=True, logprobs=4, seed=i,
                             temperature=i % 2) for i in range(len(batch))]  # fmt: skip
    sync = gpu_llm(model_dir, async_scheduling=False).generate(batch, params)
    gc.collect()  # that engine's memory back before the next one
    for a, b in zip(gpu_llm(model_dir).generate(batch, params), sync, strict=True):
        a, b = a.outputs[0], b.outputs[0]
        assert a.token_ids == b.token_ids and a.logprobs == b.logprobs
