"""CPU weight offloading: layer choice, memory planning, prefetch order, and greedy parity with
the resident model (the same code path as on CUDA, minus the copy stream)."""

import gc

import pytest
import torch

from vllm_runner import LLM, SamplingParams
from vllm_runner.model.layers.quant import Int8WeightOnly
from vllm_runner.model.loader import _instantiate
from vllm_runner.tokenizer import load_hf_config
from vllm_runner.worker.memory import OFFLOAD_STEP_BUDGET, GiB, weights_fit_error
from vllm_runner.worker.offload import (
    align,
    choose_offload_layers,
    decoder_layers,
    linear_tensors,
    plan_weights,
)

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea:",
    "def fibonacci(n):",
    "Three reasons to learn Rust are",
]


# ---- which layers ------------------------------------------------------------------------------
def test_choose_offload_layers_spreads_evenly_from_the_last_layer():
    assert choose_offload_layers([10] * 8, 0) == ()
    assert choose_offload_layers([10] * 8, 40) == (1, 3, 5, 7)
    assert choose_offload_layers([10] * 8, 31) == (1, 3, 5, 7)  # whole layers, rounded up
    assert choose_offload_layers([10] * 8, 15) == (3, 7)
    assert choose_offload_layers([10] * 8, 1000) == tuple(range(8))
    picked = choose_offload_layers([10] * 32, 190)  # 19 layers -> 20
    assert len(picked) == 20 and picked[-1] == 31 and 0 not in picked
    gaps = {b - a for a, b in zip(picked, picked[1:], strict=False)}
    assert gaps <= {1, 2}  # evenly spread, never a long resident run next to a long offloaded one


def test_odd_layer_count_rounds_up_to_even():
    for need in range(1, 9):
        count = len(choose_offload_layers([10] * 9, need * 10))
        assert count == min(9, need + need % 2)


# ---- memory planning ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_config(default_model_dir):
    return load_hf_config(default_model_dir)


def test_plan_matches_the_built_model(hf_config):
    meta = _instantiate(hf_config, torch.float32, torch.device("meta"))
    plan = plan_weights(meta, None, 0.0)
    real = _instantiate(hf_config, torch.float32, torch.device("cpu"))
    assert plan.total_bytes == sum(p.nbytes for p in real.parameters())  # tied counted once
    assert plan.offload_layers == () and plan.resident_bytes == plan.total_bytes
    assert plan.quantize_saves_bytes > 0.7 * plan.total_bytes / 2  # fp32 linears -> int8

    int8 = plan_weights(meta, Int8WeightOnly(), 0.05)
    layer = decoder_layers(meta)[0]
    linear_numel = sum(m.weight.numel() for m in layer.modules() if hasattr(m, "quant_method"))
    linear_out = sum(m.out_features for m in layer.modules() if hasattr(m, "quant_method"))
    assert int8.layer_bytes[0] == pytest.approx(linear_numel + 4 * linear_out, abs=8 * 256)
    assert len(int8.offload_layers) % 2 == 0
    assert int8.offloaded_bytes >= 0.05 * GiB and len(int8.offload_layers) < 30
    assert int8.resident_bytes == int8.total_bytes - int8.offloaded_bytes + 2 * int8.layer_bytes[0]


def test_weights_fit_error_names_bytes_and_fixes():
    kw = dict(utilization=0.9, total_bytes=80 * GiB, offloaded_bytes=0, layer_bytes=GiB // 2,
              floor_bytes=4 * GiB)  # fmt: skip
    assert weights_fit_error(10 * GiB, 20 * GiB, quantize_saves_bytes=GiB, **kw) is None
    msg = weights_fit_error(30 * GiB, 20 * GiB, quantize_saves_bytes=8 * GiB, **kw)
    assert f"{10 * GiB} bytes" in msg and "missing" in msg
    assert "cpu_offload_gb=11 or more" in msg  # missing + two working buffers
    assert "quantization='int8' or 'fp8' (saves 8.00 GiB" in msg
    assert "gpu_memory_utilization" in msg and "max_model_len" in msg
    # 0.9 of 80 GiB is 72 GiB: 52 of them held outside this process leave the 20 GiB budget
    assert "leaves 20.00 GiB and the 52.00 GiB other processes and CUDA contexts hold" in msg
    quantized = weights_fit_error(30 * GiB, 20 * GiB, quantize_saves_bytes=0, **kw)
    assert "quantization=" not in quantized
    # what stays with every layer offloaded is over the budget: no offload to suggest
    floor = {**kw, "floor_bytes": 3 * GiB}
    msg = weights_fit_error(30 * GiB, 2 * GiB, quantize_saves_bytes=GiB, **floor)
    assert "cpu_offload_gb=" not in msg and f"{3 * GiB} bytes (3.00 GiB" in msg
    assert "cpu_offload_gb cannot make this fit" in msg


def test_weight_plan_floor_is_every_layer_offloaded(hf_config):
    """floor_bytes is the resident bytes of a plan that offloads every decoder layer."""
    model = _instantiate(hf_config, torch.float32, torch.device("meta"))
    plan = plan_weights(model, None, 0.0)
    everything = plan_weights(model, None, plan.total_bytes / GiB)
    assert everything.offload_layers == tuple(range(len(plan.layer_bytes)))
    assert plan.floor_bytes == everything.resident_bytes < plan.resident_bytes


# ---- the engine ----------------------------------------------------------------------------------
def make_llm(path: str, **kw) -> LLM:
    return LLM(path, dtype="float32", device="cpu", max_model_len=256, cpu_kv_cache_gb=0.05, **kw)


def greedy_tokens(llm: LLM, prompts: list[str] = PROMPTS) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]


@pytest.fixture(scope="module")
def resident(default_model_dir) -> LLM:
    return make_llm(default_model_dir)


@pytest.fixture(scope="module")
def offloaded(default_model_dir) -> LLM:
    return make_llm(default_model_dir, cpu_offload_gb=0.15)


def test_offloaded_greedy_tokens_identical(resident, offloaded):
    offloader = offloaded.engine.runner.model.weight_offloader
    assert len(offloader.host) >= 8  # streams: far more layers than working buffers
    assert greedy_tokens(offloaded) == greedy_tokens(resident)


def test_stats_report_resident_offloaded_and_kv_bytes(resident, offloaded):
    r, o = resident.stats(), offloaded.stats()
    offloader = offloaded.engine.runner.model.weight_offloader
    assert r["weight_bytes_offloaded"] == 0
    model = resident.engine.runner.model
    head = model.lm_head.cpu_packed  # tied: a packed copy next to the embedding (CPU)
    head_bytes = head.numel() * head.element_size()
    assert r["weight_bytes_resident"] == sum(p.nbytes for p in model.parameters()) + head_bytes
    assert offloaded.engine.runner.model.lm_head.cpu_packed is None  # offloading packs nothing
    layers = decoder_layers(resident.engine.runner.model)
    streamed = [i for i, layer in enumerate(decoder_layers(offloaded.engine.runner.model))
                if layer._forward_pre_hooks]  # fmt: skip
    moved = sum(t.nbytes for i in streamed for _, _, t in linear_tensors(layers[i]))
    assert o["weight_bytes_offloaded"] == offloader.offloaded_bytes == moved >= 0.15 * GiB
    # every offloaded byte left the device; two layer-sized working buffers came instead
    assert offloader.buffer_bytes == 2 * offloader.host[0].numel()
    assert o["weight_bytes_resident"] == (
        r["weight_bytes_resident"] - head_bytes - moved + offloader.buffer_bytes
    )
    assert r["kv_cache_bytes"] == o["kv_cache_bytes"] > 0


def test_every_forward_streams_every_layer_one_ahead(offloaded):
    """Layer j+1's copy is issued when layer j starts (double buffering, one ahead); each
    forward copies each offloaded layer exactly once, the first one at the end of the step
    before."""
    model = offloaded.engine.runner.model
    offloader = model.weight_offloader
    layers = decoder_layers(model)
    ids = [i for i, layer in enumerate(layers) if layer._forward_pre_hooks]
    n = len(ids)
    offloaded.generate(PROMPTS[:1], SamplingParams(max_tokens=2))  # warm: layer 0 prefetched
    events: list[tuple[str, int]] = []
    load = offloader._load

    def logged_load(j: int) -> None:
        if offloader.owner[j % offloader.num_slots] != j:
            events.append(("copy", ids[j]))
        load(j)

    offloader._load = logged_load
    handles = [
        layers[i].register_forward_pre_hook(lambda m, a, i=i: events.append(("run", i)))
        for i in ids
    ]
    forwards: list[int] = []
    handles.append(model.register_forward_pre_hook(lambda m, a: forwards.append(1)))
    before = offloader.copies
    try:
        offloaded.generate(PROMPTS[:2], SamplingParams(max_tokens=4, temperature=0.0))
    finally:
        offloader._load = load
        for h in handles:
            h.remove()
    assert forwards and offloader.copies - before == n * len(forwards)
    one_step = [e for k in range(n) for e in (("copy", ids[(k + 1) % n]), ("run", ids[k]))]
    assert events == one_step * len(forwards)


def test_offloaded_int8_moves_int8_bytes_and_matches_resident_int8(default_model_dir):
    int8 = make_llm(default_model_dir, quantization="int8")
    both = make_llm(default_model_dir, quantization="int8", cpu_offload_gb=0.05)
    offloader = both.engine.runner.model.weight_offloader
    layer = decoder_layers(both.engine.runner.model)[-1]
    dtypes = {m.weight.dtype for m in layer.modules() if hasattr(m, "quant_method")}
    assert dtypes == {torch.int8}
    numel = sum(m.weight.numel() for m in layer.modules() if hasattr(m, "quant_method"))
    assert offloader.host[-1].numel() == pytest.approx(numel, rel=0.01)  # ~1 byte per weight
    assert offloader.host[-1].numel() == sum(
        align(p.nbytes) for m in layer.modules() if hasattr(m, "quant_method")
        for p in m.parameters()
    )  # fmt: skip
    assert greedy_tokens(both, PROMPTS[:2]) == greedy_tokens(int8, PROMPTS[:2])


@pytest.mark.parametrize(
    ("case", "cap", "slope", "expected_budget", "expected_blocks"),
    [
        ("KV short: smaller steps", 200_000, 10, 2048, 1785),
        ("gain under 1.25x: keep", 200_000, 1, 8192, 1908),
        ("no room at 8192, room at 2048", 50_000, 10, 2048, 285),
        ("out of memory at 8192", 50_000, "oom", 2048, 285),
        ("room at neither", 10_000, 10, None, None),
        ("a set budget is kept", 50_000, "set", None, None),
        ("resident weights", 50_000, "resident", None, None),
        ("resident weights, out of memory", 50_000, "oom-resident", None, None),
    ],
)
def test_kv_sizing_decisions_with_faked_cuda_queries(
    offloaded, monkeypatch, case, cap, slope, expected_budget, expected_blocks
):
    """_gpu_blocks' decisions (CUDA-only code) with the profile and the memory query faked:
    peak = 1000 + slope * step tokens bytes, blocks of 100 bytes under ``cap``; 256 sequences
    of 256 tokens need 4096 blocks, more than any case has."""
    import dataclasses

    from vllm_runner.worker import memory

    runner = offloaded.engine.runner
    monkeypatch.setattr(runner, "scheduler_config", runner.scheduler_config)  # restored after
    assert runner.scheduler_config.max_num_batched_tokens == 8192
    assert runner.scheduler_config.default_budget

    def profile(num_tokens: int) -> int:
        if slope in ("oom", "oom-resident") and num_tokens == 8192:
            raise torch.OutOfMemoryError("fake: out of memory")
        return 1000 + (1 if slope == 1 else 10) * num_tokens

    def num_blocks_for_gpu(device, utilization, block_bytes, peak_bytes, held_bytes):
        if cap - peak_bytes < block_bytes:
            raise ValueError(f"fake: no room for the KV cache at a peak of {peak_bytes}")
        return (cap - peak_bytes) // block_bytes

    monkeypatch.setattr(runner, "_profile_peak_bytes", profile)
    monkeypatch.setattr(memory, "num_blocks_for_gpu", num_blocks_for_gpu)
    if slope == "set":
        runner.scheduler_config = dataclasses.replace(runner.scheduler_config,
                                                      default_budget=False)  # fmt: skip
    if slope in ("resident", "oom-resident"):
        monkeypatch.setattr(runner.model, "weight_offloader", None)
    if slope == "oom-resident":  # a ValueError naming the setting, not torch's bare OOM
        match = r"max_num_batched_tokens=8192 tokens ran out of device memory \(fake: out of"
        with pytest.raises(ValueError, match=match) as e:
            runner._gpu_blocks(100)
        assert "max_model_len" not in str(e.value)  # the profile's peak does not depend on it
        return
    if expected_budget is None:
        with pytest.raises(ValueError, match="no room"):
            runner._gpu_blocks(100)
        assert runner.scheduler_config.max_num_batched_tokens == 8192
        return
    assert runner._gpu_blocks(100) == expected_blocks, case
    assert runner.scheduler_config.max_num_batched_tokens == expected_budget, case


# ---- GPU -----------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_offload_matches_resident(tmp_path):
    """Random SmolLM2-shape model, bf16: offloaded (pinned host, copy stream) vs resident
    greedy tokens identical, with int8 too."""
    path = _random_smol(tmp_path)
    kw = dict(dtype="bfloat16", device="cuda", max_model_len=1024, gpu_memory_utilization=0.3)
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    prompts = [[(7 * i + j) % 49152 for j in range(5 + 17 * i)] for i in range(6)]
    # NOTE: eager on both sides: graphs fix the decode split count, which changes rounding.
    eager = dict(kw, enforce_eager=True)
    ref_llm = LLM(path, **eager)
    ref = [o.outputs[0].token_ids for o in ref_llm.generate(prompts, params)]
    off = LLM(path, cpu_offload_gb=0.5, **kw)
    assert not off.engine.runner.graphs.graphs  # no graphs captured: eager fallback (logged)
    assert off.engine.runner.model.weight_offloader.host[0].is_pinned()
    assert [o.outputs[0].token_ids for o in off.generate(prompts, params)] == ref
    # one row: the bf16 layers on the PDL GEMV, offloaded vs resident
    ref_alone = ref_llm.generate(prompts[-1:], params)[0].outputs[0].token_ids
    assert off.generate(prompts[-1:], params)[0].outputs[0].token_ids == ref_alone
    int8_llm = LLM(path, quantization="int8", **eager)
    int8 = [o.outputs[0].token_ids for o in int8_llm.generate(prompts, params)]
    alone = int8_llm.generate(prompts[-1:], params)[0].outputs[0].token_ids
    both = LLM(path, quantization="int8", cpu_offload_gb=0.2, **kw)
    assert [o.outputs[0].token_ids for o in both.generate(prompts, params)] == int8
    # one row: the int8 GEMV requests weights before its in-kernel PDL wait; offloaded layers'
    # weights are rewritten between forwards, ordered by event waits that PDL does not relax
    assert both.generate(prompts[-1:], params)[0].outputs[0].token_ids == alone


@pytest.mark.gpu
def test_gpu_offloaded_engine_short_of_kv_takes_smaller_steps(tmp_path):
    """0.75 GiB for an offloaded SmolLM2-shape engine (~0.1 GiB of weights on the device):
    a 16384-token profile (~0.45 GiB of activations and scratch) leaves far less KV than a
    2048-token one, and 256 sequences of 8192 tokens (~48 GB) fit in neither, so the engine
    takes 2048-token steps (a set budget stays); its tokens equal the resident engine's."""
    path = _random_smol(tmp_path)
    kw = dict(dtype="bfloat16", device="cuda", max_model_len=8192)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    prompts = [[(5 * i + j) % 49152 for j in range(3 + 11 * i)] for i in range(4)]
    ref_llm = LLM(path, enforce_eager=True, gpu_memory_utilization=0.3, **kw)
    ref = [o.outputs[0].token_ids for o in ref_llm.generate(prompts, params)]
    del ref_llm
    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    # 0.75 GiB on top of what others hold (as the engine counts it)
    cap = (total - free - torch.cuda.memory_reserved() + 0.75 * GiB) / total
    off = LLM(path, cpu_offload_gb=0.2, gpu_memory_utilization=cap, **kw)
    assert off.engine.scheduler.config.max_num_batched_tokens == OFFLOAD_STEP_BUDGET
    assert off.engine.runner.scheduler_config is off.engine.scheduler.config
    assert [o.outputs[0].token_ids for o in off.generate(prompts, params)] == ref
    del off
    gc.collect()
    kept = LLM(path, cpu_offload_gb=0.2, gpu_memory_utilization=cap,
               max_num_batched_tokens=4096, **kw)  # fmt: skip
    assert kept.engine.scheduler.config.max_num_batched_tokens == 4096


@pytest.mark.gpu
def test_gpu_model_that_cannot_fit_fails_at_start_with_the_fix(tmp_path):
    path = _random_smol(tmp_path)
    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    # 0.15 GiB on top of what others hold (as the engine counts it): less than the ~0.25 GiB
    # of bf16 weights, more than the ~0.07 GiB that stay resident with every layer offloaded
    tiny = (total - free - torch.cuda.memory_reserved() + 0.15 * GiB) / total
    with pytest.raises(ValueError, match=r"bytes \(.* GiB\) missing.*cpu_offload_gb=") as e:
        LLM(path, dtype="bfloat16", device="cuda", gpu_memory_utilization=tiny)
    assert "quantization='int8'" in str(e.value)


@pytest.mark.gpu
@pytest.mark.parametrize("quantization", ["int8", "fp8"])
def test_gpu_quantized_engines_shrink_weights_and_stay_close(tmp_path, quantization):
    """Random weights make greedy choices fragile, so this checks the first tokens only and the
    weight bytes; tests/unit/test_quant.py bounds the layer error."""
    from vllm_runner.model.layers.quant import fp8_supported

    if quantization == "fp8" and not fp8_supported(torch.device("cuda"))[0]:
        pytest.skip("fp8 needs compute capability >= 8.9")
    # NOTE: 4 layers, not 30: a deep random network amplifies any perturbation until its
    # near-flat logits decorrelate (fp8 W8A8 kept 4/8 first tokens in bf16's top-5 at 30).
    path = _random_smol(tmp_path, num_layers=4)
    kw = dict(dtype="bfloat16", device="cuda", max_model_len=512, gpu_memory_utilization=0.3)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, logprobs=5)
    prompts = [[(7 * i + j) % 49152 for j in range(5 + 17 * i)] for i in range(8)]
    base = LLM(path, **kw)
    top5 = [set(o.outputs[0].logprobs[0]) for o in base.generate(prompts, params)]
    quant = LLM(path, quantization=quantization, **kw)
    got = [o.outputs[0].token_ids[0] for o in quant.generate(prompts, params)]
    # The bf16 criterion of the GPU parity tests: the quantized choice is in bf16's top-5.
    in_top5 = [g in t for g, t in zip(got, top5, strict=True)]
    assert sum(in_top5) >= 7, f"{quantization} first tokens in bf16 top-5: {in_top5}"
    assert quant.engine.runner.graphs is not None  # quantized layers capture fine
    linear = base.stats()["weight_bytes_resident"] - 49152 * 576 * 2  # minus the embedding
    saved = base.stats()["weight_bytes_resident"] - quant.stats()["weight_bytes_resident"]
    assert saved > 0.45 * linear


def _random_smol(tmp_path, num_layers: int = 30) -> str:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=num_layers,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
        tie_word_embeddings=True, rope_theta=100000.0, architectures=["LlamaForCausalLM"],
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.05)
    model.save_pretrained(tmp_path)
    return str(tmp_path)
