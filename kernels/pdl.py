"""Programmatic dependent launch (PDL, Hopper and newer) for the decode-path kernels.

A kernel launched with ``launch_pdl=True`` may start while its predecessor in the stream is
still running; it must call ``wait_for_predecessor`` before it reads anything an earlier
kernel wrote and before it stores anything (its output memory may be an earlier kernel's
input, recycled by the allocator). What it does before that wait overlaps the predecessor:
the one-row GEMV requests its weights there, so at batch 1 the weight stream of a
projection starts while the small norm / rotary / attention kernels before it run. Calling
``gdc_launch_dependents`` right after the wait lets the next kernel launch only once this one
runs, so at most one kernel waits ahead. Graph capture records the launches as programmatic
edges. ``VLLM_RUNNER_PDL=0`` turns it off (A/B timing).
"""

import functools
import os

import torch
import triton
import triton.language as tl


@triton.jit
def wait_for_predecessor(PDL: tl.constexpr):
    """No-op unless PDL: wait for the previous kernel's writes, then let the next launch."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@functools.cache
def _capable(index: int) -> bool:
    # NOTE: Triton before ~3.4 has neither the in-kernel wait nor the launch attribute.
    has_gdc = hasattr(getattr(tl.extra, "cuda", None), "gdc_wait")
    return has_gdc and torch.cuda.get_device_capability(index)[0] >= 9


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch with PDL (CUDA, compute capability >= 9.0, a
    Triton that has it)."""
    if device.type != "cuda" or os.environ.get("VLLM_RUNNER_PDL", "1") == "0":
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


def pdl_launch(device: torch.device) -> dict:
    """Launch keywords for ``kernel[grid](...)``: the PDL constexpr and, where enabled, the
    launch attribute."""
    on = pdl_enabled(device)
    return {"PDL": on, "launch_pdl": True} if on else {"PDL": False}
