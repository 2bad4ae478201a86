"""Engine settings: the default step budget follows vLLM's choice per device and usage, and
offloaded engines short of KV memory trade it for larger decode batches."""

from types import SimpleNamespace

import pytest
import torch

from vllm_runner.config import SERVING_PIECEWISE_MAX_TOKENS, EngineArgs, default_step_budget
from vllm_runner.worker.memory import (
    OFFLOAD_STEP_BUDGET,
    num_blocks_for_cpu,
    num_blocks_for_gpu,
    offload_step_budget,
)

GiB = 2**30


def test_cpu_budget_is_8192_offline_and_serving():
    cpu = torch.device("cpu")
    assert default_step_budget(cpu, serving=False) == 8192
    assert default_step_budget(cpu, serving=True) == 8192


@pytest.mark.parametrize(
    ("name", "memory", "offline", "serving"),
    [
        ("NVIDIA H100 80GB HBM3", 80 * GiB, 16384, 8192),
        ("NVIDIA H200", 141 * GiB, 16384, 8192),
        ("NVIDIA A100-SXM4-80GB", 80 * GiB, 8192, 8192),  # larger steps measured slower
        ("NVIDIA L4", 24 * GiB, 8192, 8192),
        ("a card of 70 GiB", 70 * GiB, 16384, 8192),  # "70 GiB or more"
    ],
)
def test_gpu_budget_by_card(monkeypatch, name, memory, offline, serving):
    props = SimpleNamespace(name=name, total_memory=memory)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    cuda = torch.device("cuda")
    assert default_step_budget(cuda, serving=False) == offline
    assert default_step_budget(cuda, serving=True) == serving


@pytest.mark.parametrize(
    ("device", "serving", "kw", "expected"),
    [
        ("cuda", True, {}, SERVING_PIECEWISE_MAX_TOKENS),  # the service's mixed steps
        ("cuda", False, {}, 0),  # offline: few small mixed steps
        ("cuda", True, {"enforce_eager": True}, 0),  # no graphs at all
        ("cpu", True, {}, 0),
        ("cuda", True, {"piecewise_max_tokens": 0}, 0),  # set: always wins
        ("cpu", False, {"piecewise_max_tokens": 512}, 512),
    ],
)
def test_piecewise_graphs_by_default_only_when_serving_with_graphs(device, serving, kw, expected):
    args = EngineArgs(**kw)
    assert args.resolve_piecewise_max_tokens(torch.device(device), serving) == expected


def test_explicit_budget_wins(monkeypatch):
    props = SimpleNamespace(name="NVIDIA H200", total_memory=141 * GiB)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    args = EngineArgs(max_num_batched_tokens=512)
    assert args.scheduler_config(1024, torch.device("cuda")).max_num_batched_tokens == 512
    assert EngineArgs().scheduler_config(1024, torch.device("cuda")).max_num_batched_tokens == (
        16384
    )


def test_scheduler_config_records_whether_the_budget_was_set():
    cpu = torch.device("cpu")
    assert EngineArgs().scheduler_config(1024, cpu).default_budget
    assert not EngineArgs(max_num_batched_tokens=8192).scheduler_config(1024, cpu).default_budget


@pytest.mark.parametrize(
    ("budget", "default", "offloading", "kv_tokens", "seqs", "expected"),
    [
        (16384, True, True, 26_000, 256, OFFLOAD_STEP_BUDGET),  # KV short: smaller steps
        (16384, True, True, 400_000, 256, None),  # every sequence fits at full length: keep
        (16384, True, False, 26_000, 256, None),  # resident weights: keep
        (16384, False, True, 26_000, 256, None),  # the user's budget: keep
        (2048, True, True, 0, 256, None),  # already that small
        (8192, True, True, 0, 256, OFFLOAD_STEP_BUDGET),  # no room at all yet
        (16384, True, True, 26_000, 4096, 4096),  # never below one decode token a sequence
    ],
)
def test_offload_step_budget(budget, default, offloading, kv_tokens, seqs, expected):
    assert offload_step_budget(budget, default, offloading, kv_tokens, seqs, 1280) == expected


@pytest.mark.parametrize(
    "field, value, kind",
    [
        ("max_model_len", "64", "an integer"),
        ("max_model_len", 64.5, "an integer"),
        ("max_num_seqs", True, "an integer"),
        ("block_size", 16.0, "an integer"),
        ("num_kv_blocks", 3.5, "an integer"),
        ("seed", "abc", "an integer"),
        ("gpu_memory_utilization", "0.9", "a number"),
        ("cpu_offload_gb", "1", "a number"),
        ("enforce_eager", "yes", "true or false"),
        ("trust_remote_code", "yes", "true or false"),
        ("generation_config", "hf", r"'auto' \(the model's sampling defaults\), 'vllm' .*"),
        # numbers out of range: refused at once, not a conversion error while loading
        ("cpu_offload_gb", float("nan"), "a finite number"),
        ("cpu_offload_gb", float("inf"), "a finite number"),
        ("cpu_kv_cache_gb", float("nan"), "a finite number"),
        ("cpu_kv_cache_gb", float("inf"), "a finite number"),
        ("cpu_kv_cache_gb", -1.0, "> 0"),
        ("cpu_kv_cache_gb", 0, "> 0"),
        ("admission_interval", 0, ">= 1"),
        ("admission_interval", 2.0, "an integer"),
        ("piecewise_max_tokens", -1, r">= 0 \(0 turns them off\)"),
        ("piecewise_max_tokens", "512", "an integer"),
        ("dtype", torch.int8, r"'auto' or one of \[.*\]"),
        # torch.manual_seed's range: not an overflow error from the model runner
        ("seed", 2**64, r"an integer in \[-2\*\*63, 2\*\*64\)"),
        # spellings torch.device() refuses: not a RuntimeError (or AttributeError) later
        ("device", "cuda:abc", r"'auto', 'cpu' or 'cuda\[:N\]'"),
        ("device", "cuda:-1", r"'auto', 'cpu' or 'cuda\[:N\]'"),
        ("device", None, r"'auto', 'cpu' or 'cuda\[:N\]'"),
        ("device", "cuda:01", r"'auto', 'cpu' or 'cuda\[:N\]'"),  # torch.device() fails on it
        # (each below passed validation, found by hand mutation)
        ("gpu_memory_utilization", True, "a number"),  # not read as 1.0
        ("enforce_eager", None, "true or false"),  # None: the default of two switches only
        ("seed", -(2**63) - 1, r"an integer in \[-2\*\*63, 2\*\*64\)"),
        ("tensor_parallel_size", 0, r"1 \(this engine runs a model on one device\)"),
        ("max_num_seqs", 0, ">= 1"),
        ("max_num_batched_tokens", 0, ">= 1"),  # (0 was read as unset: the default budget)
        ("block_size", 256, "one of 8, 16, 32, 64, 128"),
        ("gpu_memory_utilization", 0.0, r"in \(0, 1\]"),
        ("num_kv_blocks", 0, ">= 1"),
        ("cpu_offload_gb", -0.5, ">= 0"),
        ("quantization", "gguf", r"one of \(None, 'awq', 'compressed-tensors', .*, 'int8'\)"),
        ("kv_cache_dtype", None, r"one of \('auto', 'fp8', 'fp8_e4m3'\)"),
        # None only where it means a default (it was a TypeError of '<' for these two)
        ("max_num_seqs", None, "an integer"),
        ("admission_interval", None, "an integer"),
        ("block_size", None, "an integer"),
        ("scheduling_policy", "lifo", "'fcfs' or 'priority'"),
        ("scheduling_policy", "FCFS", "'fcfs' or 'priority'"),  # (vLLM's names: lower case)
        ("scheduling_policy", None, "'fcfs' or 'priority'"),
    ],
)
def test_engine_arguments_of_the_wrong_type_name_themselves(field, value, kind):
    """Caught at once with the value named, not as a TypeError deep in the engine build."""
    with pytest.raises(ValueError, match=f"{field} must be {kind}, got {value!r}"):
        EngineArgs(**{field: value}).validate()


@pytest.mark.parametrize(
    "field, value",
    [("seed", -(2**63)), ("seed", -1), ("seed", 2**64 - 1), ("swap_space", 0),
     ("block_size", 8), ("block_size", 128), ("gpu_memory_utilization", 1.0),
     ("max_model_len", 2), ("max_num_seqs", 1), ("max_num_batched_tokens", 1),
     ("num_kv_blocks", 1), ("cpu_offload_gb", 0), ("piecewise_max_tokens", 0),
     ("kv_cache_dtype", "fp8_e4m3"), ("async_scheduling", None), ("device", "cuda:10"),
     ("scheduling_policy", "priority")],
)  # fmt: skip
def test_values_at_the_limits_are_taken(field, value):
    args = EngineArgs(**{field: value})
    args.validate()
    assert getattr(args, field) == value


def test_defaults_are_vllms():
    """A script moved from vLLM gets the engine it sized for: vLLM's block size, memory
    share, seed 0 (V1's), prefix caching on, 256 sequences a step and 4 GiB of swap."""
    args = EngineArgs()
    assert (args.block_size, args.gpu_memory_utilization, args.seed) == (16, 0.9, 0)
    assert args.enable_prefix_caching and not args.enforce_eager
    assert (args.max_num_seqs, args.swap_space, args.max_model_len) == (256, 4.0, None)
    assert (args.dtype, args.kv_cache_dtype, args.quantization) == ("auto", "auto", None)
    assert args.scheduling_policy == "fcfs"


def test_fp8_weights_on_the_cpu_are_refused_before_loading():
    with pytest.raises(ValueError, match=r"quantization='fp8' needs .* not device='cpu'; use "):
        EngineArgs(quantization="fp8", device="cpu").validate()
    EngineArgs(quantization="int8", device="cpu").validate()


def test_a_relative_generation_config_folder_is_made_absolute(tmp_path, monkeypatch):
    """One spelling per folder (an engine's settings name it the same from any directory)."""
    (tmp_path / "defaults").mkdir()
    monkeypatch.chdir(tmp_path)
    args = EngineArgs(generation_config="defaults")
    args.validate()
    assert args.generation_config == str(tmp_path / "defaults")
    for name in ("auto", "vllm"):
        args = EngineArgs(generation_config=name)
        args.validate()
        assert args.generation_config == name


def test_scheduler_config_carries_the_settings():
    args = EngineArgs(max_num_seqs=5, admission_interval=3, scheduling_policy="priority")
    config = args.scheduler_config(300, torch.device("cpu"))
    assert (config.max_num_seqs, config.max_num_batched_tokens, config.max_model_len) == (
        5, 8192, 300
    )  # fmt: skip
    assert (config.admission_interval, config.scheduling_policy) == (3, "priority")
    assert EngineArgs().scheduler_config(300, torch.device("cpu")).scheduling_policy == "fcfs"


def test_max_model_len_may_equal_the_models():
    config = SimpleNamespace(max_position_embeddings=512)
    assert EngineArgs(max_model_len=512).resolve_max_model_len(config) == 512
    with pytest.raises(ValueError, match="max_model_len=513 exceeds the model's "
                       "max_position_embeddings=512$"):  # fmt: skip
        EngineArgs(max_model_len=513).resolve_max_model_len(config)


def test_a_torch_dtype_is_taken_as_its_name():
    for dtype, name in ((torch.bfloat16, "bfloat16"), (torch.float16, "float16"),
                        (torch.float32, "float32")):  # fmt: skip
        args = EngineArgs(dtype=dtype)
        args.validate()
        assert args.dtype == name


@pytest.mark.parametrize(
    "config_dtype, cuda",
    [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16), ("float16", torch.float16),
     (torch.float32, torch.bfloat16), (None, torch.bfloat16)],
)  # fmt: skip
def test_auto_dtype_follows_the_config_on_gpus_and_is_float32_on_cpus(config_dtype, cuda):
    """As vLLM: a half-precision config keeps its dtype, a float32 (or none) runs in bf16;
    an explicit dtype wins. The CPU path runs float32."""
    config = SimpleNamespace(dtype=config_dtype)
    assert EngineArgs().resolve_dtype(config, torch.device("cuda")) == cuda
    assert EngineArgs().resolve_dtype(config, torch.device("cpu")) == torch.float32
    assert EngineArgs(dtype="half").resolve_dtype(config, torch.device("cpu")) == torch.float16
    # configs saved by older transformers name it torch_dtype
    old = SimpleNamespace(torch_dtype=config_dtype)
    assert EngineArgs().resolve_dtype(old, torch.device("cuda")) == cuda


def test_a_torch_device_is_taken_as_its_name():
    for device, name in ((torch.device("cpu"), "cpu"), (torch.device("cuda", 1), "cuda:1")):
        args = EngineArgs(device=device)
        args.validate()
        assert args.device == name


def test_a_gpu_index_past_the_visible_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert EngineArgs(device="cuda:1").resolve_device() == torch.device("cuda:1")
    with pytest.raises(ValueError, match=r"device='cuda:2' was asked for, but torch sees 2 CUDA"):
        EngineArgs(device="cuda:2").resolve_device()


def test_sliding_window_bounds_max_model_len_only_without_window_attention():
    """A sliding-window model whose class attends within its windows (Mistral, Qwen2,
    Phi-3, Gemma) serves every position; a model class without window attention (here a
    config naming no architecture) gives the same tokens only up to its window, so
    max_model_len stops there; Qwen2's window counts only when use_sliding_window is on."""
    from types import SimpleNamespace

    mistral = SimpleNamespace(max_position_embeddings=32768, sliding_window=4096,
                              architectures=["MistralForCausalLM"])  # fmt: skip
    assert EngineArgs().resolve_max_model_len(mistral) == 32768
    unknown = SimpleNamespace(max_position_embeddings=32768, sliding_window=4096)
    assert EngineArgs().resolve_max_model_len(unknown) == 4096
    assert EngineArgs(max_model_len=2048).resolve_max_model_len(unknown) == 2048
    with pytest.raises(ValueError, match=r"max_model_len=8192 exceeds the model's "
                       r"sliding_window=4096 \(full attention only\)"):  # fmt: skip
        EngineArgs(max_model_len=8192).resolve_max_model_len(unknown)
    qwen = SimpleNamespace(max_position_embeddings=32768, sliding_window=4096,
                           use_sliding_window=False)  # fmt: skip
    assert EngineArgs().resolve_max_model_len(qwen) == 32768
    no_window = SimpleNamespace(max_position_embeddings=8192, sliding_window=None)
    assert EngineArgs().resolve_max_model_len(no_window) == 8192
    # transformers' own layer types: Qwen2 slides from max_window_layers on, served whole
    from transformers import Qwen2Config

    kw = dict(max_position_embeddings=512, use_sliding_window=True, sliding_window=32,
              num_hidden_layers=2)  # fmt: skip
    assert EngineArgs().resolve_max_model_len(Qwen2Config(max_window_layers=2, **kw)) == 512
    assert EngineArgs().resolve_max_model_len(Qwen2Config(max_window_layers=1, **kw)) == 512


def test_auto_device_warns_when_a_driver_is_there_but_torch_sees_no_gpu(
    monkeypatch, tmp_path, caplog
):
    """PyPI's torch is a CUDA build that needs a recent driver: on a GPU host with an older
    one, device='auto' falls back to the CPU, and says why instead of serving slowly."""
    from vllm_runner import config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(config, "NVIDIA_DRIVER", str(tmp_path / "missing"))
    with caplog.at_level("WARNING", logger="vllm_runner.config"):
        assert EngineArgs().resolve_device() == torch.device("cpu")
    assert not caplog.records  # a plain CPU host: nothing to say
    driver = tmp_path / "version"
    driver.write_text("NVRM version: 535.00\n")
    monkeypatch.setattr(config, "NVIDIA_DRIVER", str(driver))
    with caplog.at_level("WARNING", logger="vllm_runner.config"):
        assert EngineArgs().resolve_device() == torch.device("cpu")
    assert "an NVIDIA driver is loaded but torch" in caplog.text
    with pytest.raises(ValueError, match=r"device='cuda' was asked for, but torch .* sees no"):
        EngineArgs(device="cuda").resolve_device()


@pytest.mark.parametrize(
    ("free", "reserved", "utilization", "expected_gib"),
    [
        (96, 4, 0.9, 80.0),  # alone: 90 GiB less the 10 GiB peak
        # another engine of this process reserves 60 GiB: what is free, less the 6 GiB the
        # largest step allocates again and the 0.5 GiB margin (not all 39.5 GiB free)
        (36, 64, 0.5, 29.5),
    ],
)
def test_kv_blocks_leave_the_largest_step_its_activations(
    monkeypatch, free, reserved, utilization, expected_gib
):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free * GiB, 100 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: reserved * GiB)
    block = 2**20
    got = num_blocks_for_gpu(torch.device("cuda"), utilization, block, 10 * GiB, 4 * GiB)
    assert got == int(expected_gib * GiB) // block


def test_a_cpu_kv_cache_larger_than_the_host_is_refused():
    """Not a zero-filled allocation that the OOM killer ends (or an allocator error)."""
    assert num_blocks_for_cpu(0.5, 2**20) == 512
    with pytest.raises(ValueError, match=r"cpu_kv_cache_gb=1000000.0 is more than this host's"):
        num_blocks_for_cpu(1e6, 2**20)


def test_a_full_card_is_named_as_such(monkeypatch):
    """When free memory, not the utilization share, leaves no block, the error says so (and
    does not ask for a higher gpu_memory_utilization)."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (3 * GiB, 100 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 97 * GiB)
    with pytest.raises(ValueError, match=r"3\.00 GiB of the 100\.0 GiB device are free"):
        num_blocks_for_gpu(torch.device("cuda"), 0.9, 2**20, 10 * GiB, 7 * GiB)


def test_decode_graph_outputs_counted_once():
    """The 35 decode graphs (buckets of 1..256 rows) share one [256, vocab] logits output."""
    from vllm_runner.worker.cuda_graphs import decode_buckets, graph_output_bytes

    assert len(decode_buckets(256)) == 35 and max(decode_buckets(256)) == 256
    assert graph_output_bytes(256, 128256, torch.bfloat16) == 256 * 128256 * 2


def test_no_room_names_what_other_processes_hold(monkeypatch):
    """The share's arithmetic adds up in the message: 90 of 100 GiB, less a 35 GiB peak and
    the 60 GiB another process holds, leaves -5 GiB. max_model_len sizes nothing here (the
    profile runs max_num_batched_tokens tokens), so lowering it is not offered as a fix."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (30 * GiB, 100 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 10 * GiB)
    with pytest.raises(ValueError) as e:
        num_blocks_for_gpu(torch.device("cuda"), 0.9, 2**20, 35 * GiB, 10 * GiB)
    msg = str(e.value)
    assert (
        "leaves -5.00 GiB" in msg
        and "and the 60.00 GiB other processes and CUDA contexts hold" in msg
    )
    assert "max_model_len" not in msg and "max_num_batched_tokens" in msg
