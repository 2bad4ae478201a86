"""Size the KV cache from the memory left after the model, with clear errors."""

import gc
import math
import os

import torch

from vllm_runner.config import CacheConfig

GiB = 1 << 30


def kv_bytes_per_block(
    num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * itemsize


def num_blocks_for_cpu(cpu_kv_cache_gb: float, block_bytes: int) -> int:
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    # The cache is zero-filled at start-up: past the host's memory that ends in the OOM
    # killer or an allocator error that names no setting, never in a running engine.
    if cpu_kv_cache_gb * GiB > host:
        raise ValueError(
            f"cpu_kv_cache_gb={cpu_kv_cache_gb} is more than this host's {host / GiB:.1f} GiB "
            "of memory: lower it"
        )
    num = int(cpu_kv_cache_gb * GiB) // block_bytes
    if num < 1:
        raise ValueError(
            f"cpu_kv_cache_gb={cpu_kv_cache_gb} holds no KV block "
            f"(one block takes {block_bytes} bytes)"
        )
    return num


def others_allocated_bytes(device: torch.device) -> int:
    """Device memory other engines in this process hold now: not a new engine's to count.
    Engines dropped but not yet collected (reference cycles) are collected first: freed
    later, in the middle of the new engine's profile, they would make its peak look smaller
    than it is, and its KV cache overrun gpu_memory_utilization."""
    if device.type != "cuda":
        return 0
    gc.collect()
    return torch.cuda.memory_allocated(device)


def num_blocks_for_gpu(
    device: torch.device, utilization: float, block_bytes: int, peak_bytes: int, held_bytes: int
) -> int:
    """Blocks that fit in ``utilization`` of the card after the profiled peak (weights +
    activations of the largest step); ``held_bytes`` of the peak are allocated now (weights,
    static buffers), the rest the largest step allocates again."""
    free, total = torch.cuda.mem_get_info(device)
    used_by_others = max(total - free - torch.cuda.memory_reserved(device), 0)
    share = int(total * utilization) - peak_bytes - used_by_others
    # Never more than is free now (other engines in this process count here) once the
    # largest step's activations are allocated again, less a margin.
    room = free - (peak_bytes - held_bytes) - (512 << 20)
    budget = min(share, room)
    num = budget // block_bytes
    if num < 1:
        if room < share:  # the card is full, whatever the setting
            raise ValueError(
                f"no room for the KV cache: {free / GiB:.2f} GiB of the {total / GiB:.1f} GiB "
                f"device are free, {(peak_bytes - held_bytes) / GiB:.2f} GiB of it for the "
                "largest step's activations and 0.5 GiB kept spare: free device memory "
                "(other engines or processes), lower max_num_batched_tokens, or use "
                "cpu_offload_gb / quantization"
            )
        # NOTE: max_model_len is no fix: the peak is a step of max_num_batched_tokens tokens.
        raise ValueError(
            f"no room for the KV cache: gpu_memory_utilization={utilization} of "
            f"{total / GiB:.1f} GiB leaves {budget / GiB:.2f} GiB after the model's peak of "
            f"{peak_bytes / GiB:.2f} GiB{_others(used_by_others)}, {block_bytes - budget} "
            "bytes short of one KV block; raise gpu_memory_utilization, lower "
            "max_num_batched_tokens, or use cpu_offload_gb / quantization"
        )
    return num


def _others(used_by_others: int) -> str:
    """The part of a message naming the device memory held outside this process's torch
    allocator (counted out of the gpu_memory_utilization share), if any."""
    if used_by_others <= 0:
        return ""
    return f" and the {used_by_others / GiB:.2f} GiB other processes and CUDA contexts hold"


OFFLOAD_STEP_BUDGET = 2048
OFFLOAD_MIN_GAIN = 1.25  # the smaller budget must leave at least this many times the blocks


def offload_step_budget(
    budget: int,
    default_budget: bool,
    offloading: bool,
    kv_tokens: int,
    max_num_seqs: int,
    max_model_len: int,
) -> int | None:
    """A smaller step budget to try, or None: only for offloaded weights whose KV cache
    cannot hold every sequence at full length (``max_num_seqs * max_model_len`` tokens)
    under the default budget.

    An offloaded step costs at least its weight copy over PCIe whatever its size (an 8B step
    of 2048 tokens computes in ~40 ms, the copy of 8 GB takes ~150 ms), while the activation
    memory a big step reserves is KV cache lost: fewer sequences share each copy. The price
    is more copies per long prompt (time to first token), so the runner takes the smaller
    budget only for ``OFFLOAD_MIN_GAIN`` times the blocks. A user-set budget is kept."""
    smaller = max(OFFLOAD_STEP_BUDGET, max_num_seqs)
    if not (offloading and default_budget) or budget <= smaller:
        return None
    return smaller if kv_tokens < max_num_seqs * max_model_len else None


def weights_fit_error(
    resident_bytes: int,
    budget_bytes: int,
    *,
    utilization: float,
    total_bytes: int,
    offloaded_bytes: int,
    floor_bytes: int,
    layer_bytes: int,
    quantize_saves_bytes: int,
) -> str | None:
    """The start-up error when the device-resident weights exceed the budget, else None.

    ``floor_bytes``: the resident bytes with every decoder layer offloaded;
    ``layer_bytes``: one decoder layer's linear weights as stored (the offload granularity);
    ``quantize_saves_bytes``: what int8 / fp8 linear weights would save (0 once quantized).
    """
    if resident_bytes <= budget_bytes:
        return None
    missing = resident_bytes - budget_bytes
    fixes = []
    if floor_bytes <= budget_bytes:
        # Two layers of working buffers stay on the device whenever anything is offloaded.
        offload_gib = math.ceil((offloaded_bytes + missing + 2 * layer_bytes) / GiB * 10) / 10
        fixes.append(
            f"cpu_offload_gb={offload_gib:g} or more (whole layers stream from host memory)"
        )
    if quantize_saves_bytes:
        fixes.append(
            f"quantization='int8' or 'fp8' (saves {quantize_saves_bytes / GiB:.2f} GiB of "
            "linear weights)"
        )
    fixes.append(f"a higher gpu_memory_utilization (now {utilization})")
    if floor_bytes > budget_bytes:
        fixes.append(
            f"a device with more memory: with every decoder layer offloaded, {floor_bytes} "
            f"bytes ({floor_bytes / GiB:.2f} GiB: embeddings, LM head, norms, two layer "
            "buffers) stay on it, so cpu_offload_gb cannot make this fit"
        )
    return (
        f"the model does not fit: its device-resident weights take {resident_bytes} bytes "
        f"({resident_bytes / GiB:.2f} GiB), but gpu_memory_utilization={utilization} of "
        f"{total_bytes / GiB:.1f} GiB leaves {max(budget_bytes, 0) / GiB:.2f} GiB"
        f"{_others(int(total_bytes * utilization) - budget_bytes)}: {missing} "
        f"bytes ({missing / GiB:.2f} GiB) missing before activations and the KV cache "
        f"(whose size max_model_len sets). Fix: {'; or '.join(fixes)}"
    )


def weight_budget(device: torch.device, utilization: float) -> tuple[int, int]:
    """(bytes weights may take under ``utilization``, total device bytes)."""
    free, total = torch.cuda.mem_get_info(device)
    used_by_others = total - free - torch.cuda.memory_reserved(device)
    return int(total * utilization) - max(used_by_others, 0), total


def kv_cache_dtype(
    cache_config: CacheConfig, model_dtype: torch.dtype, device: torch.device
) -> torch.dtype:
    """The KV cache's dtype; fp8 on CUDA needs the conversions of compute capability 8.9+."""
    dtype = cache_config.cache_dtype(model_dtype)
    if dtype.itemsize == 1 and device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise ValueError(
                f"kv_cache_dtype={cache_config.kv_cache_dtype!r} needs a GPU of compute "
                f"capability 8.9 or newer (fp8 conversions); this one is {major}.{minor}: "
                "use kv_cache_dtype='auto'"
            )
    return dtype
