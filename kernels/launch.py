"""Host-side helpers of the kernel launchers: arithmetic in plain Python (Triton's
``next_power_of_2`` and ``cdiv`` are constexpr functions: called from host code they unwrap
their arguments first, ~4 us a call on the 2-core VM, and a mixed step's attention launchers
made eight such calls a layer, a third of their Python), the device's SM count and its shared
memory a program may take."""

import functools

import torch


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def _cuda_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def num_sms(device: torch.device) -> int:
    """SM count of a CUDA device; 132 (an H100) elsewhere, where only tests use the heuristic."""
    if device.type != "cuda":
        return 132
    return _cuda_sms(_index(device))


H100_SHARED_BYTES = 232_448  # an H100's / H200's opt-in shared memory a program may take


@functools.cache
def _cuda_shared_bytes(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).shared_memory_per_block_optin


def shared_memory_bytes(device: torch.device) -> int:
    """Shared memory one program may take on a CUDA device (RTX 30 / 40, A10, L4, L40S:
    101,376; A100 166,912); an H100's elsewhere, where only tests use the heuristic."""
    if device.type != "cuda":
        return H100_SHARED_BYTES
    return _cuda_shared_bytes(_index(device))


def ptx_widening(device: torch.device) -> bool:
    """Whether 8-bit values widen by inline PTX (int8 / e4m3 weights, an e4m3 KV cache's
    word pairs): CUDA only, never the interpreter, whose tensors live on the CPU."""
    return device.type == "cuda"
