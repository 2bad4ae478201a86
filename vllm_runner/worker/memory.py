"""Size the KV cache from the memory left after the model, with clear errors."""

import torch

GiB = 1 << 30


def kv_bytes_per_block(
    num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * itemsize


def num_blocks_for_cpu(cpu_kv_cache_gb: float, block_bytes: int) -> int:
    num = int(cpu_kv_cache_gb * GiB) // block_bytes
    if num < 1:
        raise ValueError(
            f"cpu_kv_cache_gb={cpu_kv_cache_gb} holds no KV block "
            f"(one block takes {block_bytes} bytes)"
        )
    return num


def num_blocks_for_gpu(
    device: torch.device, utilization: float, block_bytes: int, peak_bytes: int
) -> int:
    """Blocks that fit in ``utilization`` of the card after the profiled peak (weights +
    activations of the largest step)."""
    free, total = torch.cuda.mem_get_info(device)
    used_by_others = total - free - torch.cuda.memory_reserved(device)
    budget = int(total * utilization) - peak_bytes - max(used_by_others, 0)
    num = budget // block_bytes
    if num < 1:
        raise ValueError(
            f"no room for the KV cache: gpu_memory_utilization={utilization} of "
            f"{total / GiB:.1f} GiB leaves {budget / GiB:.2f} GiB after the model's peak of "
            f"{peak_bytes / GiB:.2f} GiB; raise gpu_memory_utilization, lower max_model_len / "
            "max_num_batched_tokens, or use cpu_offload_gb / quantization"
        )
    return num
