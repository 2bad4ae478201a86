"""Exact numbers of the runner's host-side sizing: KV block bytes and counts, the weight
budget, fp8 KV admission, decode-graph buckets and the offload layer plan (CPU only, the
CUDA memory queries faked). Every expected value is worked out by hand in its comment."""

import gc
import weakref

import pytest
import torch
from torch import nn

from vllm_runner.config import CacheConfig
from vllm_runner.model.layers.linear import LinearBase
from vllm_runner.worker import memory
from vllm_runner.worker.cuda_graphs import DecodeGraphs, decode_buckets
from vllm_runner.worker.memory import GiB
from vllm_runner.worker.offload import (
    align,
    choose_offload_layers,
    packed_layer_bytes,
    plan_weights,
)


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (torch.float32, 49152),  # K and V: 2 * 3 layers * 16 tokens * 2 heads * 64 dims * 4 B
        (torch.bfloat16, 24576),  # ... * 2 B
        (torch.float8_e4m3fn, 12288),  # ... * 1 B
    ],
)
def test_kv_block_bytes_count_k_and_v_of_every_layer(dtype, expected):
    assert memory.kv_bytes_per_block(3, 16, 2, 64, dtype) == expected


def test_cpu_kv_blocks_round_down_and_a_cache_of_no_block_is_refused():
    # 0.5 GiB = 512 MiB holds 170 whole blocks of 3 MiB (170.67: the last one does not fit)
    assert memory.num_blocks_for_cpu(0.5, 3 * 2**20) == 170
    with pytest.raises(ValueError, match=r"cpu_kv_cache_gb=0\.001 holds no KV block"):
        memory.num_blocks_for_cpu(0.001, GiB)  # 1,073,741 bytes < one 1 GiB block


def test_cpu_kv_cache_is_bounded_by_the_hosts_memory(monkeypatch):
    sizes = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 2**18}  # a host of exactly 1 GiB
    monkeypatch.setattr(memory.os, "sysconf", sizes.__getitem__)
    assert memory.num_blocks_for_cpu(1.0, 2**20) == 1024  # all of it: allowed
    with pytest.raises(ValueError, match=r"cpu_kv_cache_gb=1\.5 is more than this host's 1\.0"):
        memory.num_blocks_for_cpu(1.5, 2**20)


def test_gpu_kv_blocks_round_down_to_whole_blocks(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (96 * GiB, 100 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 4 * GiB)
    # share: 0.5 * 100 - 10 GiB peak = 40 GiB (room: 96 - 6 - 0.5 = 89.5 GiB); 40 GiB in
    # blocks of 3 MiB is 13653.3: 13653 whole blocks, never one more than the budget
    got = memory.num_blocks_for_gpu(torch.device("cuda"), 0.5, 3 * 2**20, 10 * GiB, 4 * GiB)
    assert got == 13653


def test_memory_baseline_collects_dropped_engines_first(monkeypatch):
    """An engine dropped in a reference cycle holds its device memory until the collector
    runs: the next engine's baseline (what other engines hold) collects it first, or its
    memory freed mid-profile would shrink the new engine's peak. A CPU engine has none."""
    live = weakref.WeakSet()  # the engines alive, each holding 1 GiB of "device memory"

    class Engine:
        def __init__(self) -> None:
            self.me = self  # a reference cycle: ``del`` alone does not free it
            live.add(self)

    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: len(live) * GiB)
    enabled = gc.isenabled()
    gc.disable()  # (no automatic collection in between)
    try:
        kept, dropped = Engine(), Engine()
        del dropped
        assert len(live) == 2
        assert memory.others_allocated_bytes(torch.device("cpu")) == 0
        assert memory.others_allocated_bytes(torch.device("cuda")) == GiB
        assert list(live) == [kept]
    finally:
        if enabled:
            gc.enable()


@pytest.mark.parametrize(
    ("free", "reserved", "expected"),
    [
        (50, 10, 10),  # 100 - 50 - 10 = 40 GiB held by others: 0.5 * 100 - 40
        (96, 10, 50),  # this process reserved more than is in use: nobody else, 0.5 * 100
    ],
)
def test_weight_budget_leaves_out_what_others_hold(monkeypatch, free, reserved, expected):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free * GiB, 100 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: reserved * GiB)
    assert memory.weight_budget(torch.device("cuda"), 0.5) == (expected * GiB, 100 * GiB)


@pytest.mark.parametrize(("capability", "ok"), [((8, 6), False), ((8, 9), True), ((9, 0), True)])
def test_fp8_kv_cache_needs_compute_capability_8_9(monkeypatch, capability, ok):
    """An L4 / RTX 4090 (8.9) has the fp8 conversions; an A10 / RTX 3090 (8.6) has not."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability)
    config = CacheConfig(16, False, 0.9, None, 1.0, 0.0, kv_cache_dtype="fp8")
    cuda = torch.device("cuda")
    if ok:
        assert memory.kv_cache_dtype(config, torch.bfloat16, cuda) == torch.float8_e4m3fn
    else:
        with pytest.raises(ValueError, match=r"this one is 8\.6"):
            memory.kv_cache_dtype(config, torch.bfloat16, cuda)


def test_offload_step_budget_keeps_the_default_when_every_sequence_fits_exactly():
    full = 256 * 1280  # 256 sequences of max_model_len 1280
    assert memory.offload_step_budget(8192, True, True, full, 256, 1280) is None
    assert memory.offload_step_budget(8192, True, True, full - 1, 256, 1280) == 2048


@pytest.mark.parametrize(
    ("max_num_seqs", "expected"),
    [
        (3, [1, 2, 3]),
        (12, [1, 2, 4, 8, 12]),  # the largest batch has a bucket of its own
        (20, [1, 2, 4, 8, 16, 20]),
    ],
)
def test_decode_buckets_end_at_max_num_seqs(max_num_seqs, expected):
    assert decode_buckets(max_num_seqs) == expected


def test_a_decode_batch_pads_to_the_smallest_bucket_that_holds_it():
    graphs = DecodeGraphs(None, None, max_num_seqs=20, max_model_len=128)
    assert graphs.buckets == [1, 2, 4, 8, 16, 20]
    got = {n: graphs.bucket_for(n) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17, 20, 21)}
    assert got == {1: 1, 2: 2, 3: 4, 4: 4, 5: 8, 8: 8, 9: 16, 16: 16, 17: 20, 20: 20, 21: None}


def test_offload_covers_at_least_the_bytes_asked_for():
    # 21 bytes of layers of 10 take 3 layers (not 2), rounded up to an even 4, spread from
    # the last layer: 7 - i * 8 // 4 for i = 0..3
    assert choose_offload_layers([10] * 8, 21) == (1, 3, 5, 7)
    assert choose_offload_layers([10] * 8, 20) == (3, 7)


def test_packed_layer_bytes_align_every_tensor_to_256_bytes():
    assert [align(n) for n in (0, 1, 256, 257)] == [0, 256, 256, 512]
    layer = nn.Sequential(LinearBase(3, 5, bias=True))  # fp32: 60 B of weight, 20 B of bias
    assert packed_layer_bytes(layer, None) == 512  # each tensor starts on its own 256 B


def test_plan_counts_what_int8_would_save_with_its_scales():
    model = nn.Module()
    model.proj = LinearBase(64, 32, bias=False)  # fp32: 64 * 32 * 4 = 8192 bytes
    plan = plan_weights(model, None, 0.0)
    # int8 keeps 2048 bytes of weight and 32 fp32 scales (128 bytes): saves 8192 - 2176
    assert (plan.total_bytes, plan.quantize_saves_bytes) == (8192, 6016)


def test_gpu_kv_blocks_count_no_negative_memory_of_others(monkeypatch):
    # this process reserved 10 GiB while only 4 GiB are in use (100 - 96): nobody else holds
    # memory, so the share is 0.5 * 100 - 10 GiB peak = 40 GiB (not 46: -6 GiB never adds)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (96 * GiB, 100 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 10 * GiB)
    got = memory.num_blocks_for_gpu(torch.device("cuda"), 0.5, GiB, 10 * GiB, 4 * GiB)
    assert got == 40


def test_no_room_errors_give_the_exact_shortfall_and_activation_bytes(monkeypatch):
    cuda = torch.device("cuda")
    # share: 0.9 * 100 - 35 peak - 60 others = -5 GiB; room: 30 - 25 - 0.5 = 4.5 GiB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (30 * GiB, 100 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 10 * GiB)
    with pytest.raises(ValueError) as e:
        memory.num_blocks_for_gpu(cuda, 0.9, 2**20, 35 * GiB, 10 * GiB)
    assert f", {2**20 + 5 * GiB} bytes short of one KV block;" in str(e.value)
    # a full card: of the 3 GiB free, the largest step takes 10 - 7 = 3 GiB again
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (3 * GiB, 100 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 97 * GiB)
    with pytest.raises(ValueError) as e:
        memory.num_blocks_for_gpu(cuda, 0.9, 2**20, 10 * GiB, 7 * GiB)
    assert "3.00 GiB of the 100.0 GiB device are free, 3.00 GiB of it for the largest" in str(
        e.value
    )
    # nobody else holds memory (100 - 10 free - 90 reserved = 0): no word of other processes
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10 * GiB, 100 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 90 * GiB)
    with pytest.raises(ValueError) as e:
        memory.num_blocks_for_gpu(cuda, 0.5, 2**20, 50 * GiB, 50 * GiB)
    assert "after the model's peak of 50.00 GiB, 1048576 bytes short" in str(e.value)


FIT = dict(utilization=0.9, total_bytes=80 * GiB, offloaded_bytes=0, layer_bytes=GiB // 2,
           quantize_saves_bytes=0)  # fmt: skip
BUDGET = int(80 * GiB * 0.9)  # 72 GiB: nothing held by others


def test_weights_that_fill_the_budget_exactly_fit():
    assert memory.weights_fit_error(BUDGET, BUDGET, floor_bytes=GiB, **FIT) is None
    assert memory.weights_fit_error(BUDGET + 1, BUDGET, floor_bytes=GiB, **FIT) is not None


def test_weights_fit_error_at_a_floor_equal_to_the_budget_offers_offloading():
    msg = memory.weights_fit_error(BUDGET + GiB, BUDGET, floor_bytes=BUDGET, **FIT)
    # 1 GiB missing + two 0.5 GiB working buffers
    assert msg.endswith(
        "Fix: cpu_offload_gb=2 or more (whole layers stream from host memory); "
        "or a higher gpu_memory_utilization (now 0.9)"
    )
    assert "other processes" not in msg and "leaves 72.00 GiB:" in msg


def test_weights_fit_error_rounds_the_offload_suggestion_up():
    # 1.01 GiB missing + 1 GiB of working buffers = 2.01 GiB: 2.1 suffices, 2.0 would not
    missing = GiB + GiB // 100
    msg = memory.weights_fit_error(BUDGET + missing, BUDGET, floor_bytes=GiB, **FIT)
    assert "cpu_offload_gb=2.1 or more" in msg


def test_weights_fit_error_with_others_holding_more_than_the_share():
    # 0.9 * 80 = 72 GiB, 75 GiB held elsewhere: the budget is -3 GiB, shown as none left
    msg = memory.weights_fit_error(GiB, -3 * GiB, floor_bytes=GiB // 2, **FIT)
    assert "of 80.0 GiB leaves 0.00 GiB and the 75.00 GiB other processes" in msg
    assert f": {4 * GiB} bytes (4.00 GiB) missing" in msg
    assert "cpu_offload_gb cannot make this fit" in msg
