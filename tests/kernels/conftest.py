"""Kernel tests run on CUDA when present, else in Triton's interpreter on CPU tensors.

NOTE: triton reads TRITON_INTERPRET when each ``@triton.jit`` function is *defined* (at
import), its own ``tl.cdiv`` / ``tl.max`` / ... included. So the variable must be set before
anything imports triton: here, at conftest import, which precedes every test module under
tests/kernels. If something collected earlier already imported triton (a root conftest, an
engine test), the interpreter cannot work in this process and the kernel tests fail with a
message saying so; set TRITON_INTERPRET=1 in the environment or in tests/conftest.py.
"""

import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
INTERPRETER_UNUSABLE = (
    not HAS_CUDA and "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
)


def _patch_interpreter_bf16_dot() -> None:
    """Triton 3.9's interpreter multiplies bf16 operands of tl.dot as raw uint16 bits.

    It stores bf16 as uint16 and its ``create_dot`` feeds those bits straight to numpy; widen
    bf16 operands to fp32 first (exact), which is what the tensor cores compute.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder_cls = interpreter.InterpreterBuilder
    if getattr(builder_cls, "_bf16_dot_patched", False):
        return
    original = builder_cls.create_dot

    def widen(h: "interpreter.TensorHandle") -> "interpreter.TensorHandle":
        if h.dtype.scalar != tl.bfloat16:
            return h
        bits = h.data.astype(np.uint32) << 16
        return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):  # noqa: ANN001
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    builder_cls.create_dot = create_dot
    builder_cls._bf16_dot_patched = True


if not HAS_CUDA and not INTERPRETER_UNUSABLE:
    os.environ["TRITON_INTERPRET"] = "1"
    _patch_interpreter_bf16_dot()


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(autouse=True)
def _seed() -> None:
    if INTERPRETER_UNUSABLE:
        pytest.fail(
            "triton was imported before tests/kernels/conftest.py could set TRITON_INTERPRET=1; "
            "export TRITON_INTERPRET=1 (or set it in tests/conftest.py) on machines without CUDA"
        )
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _poison_allocations(monkeypatch: pytest.MonkeyPatch) -> None:
    """Launchers allocate outputs with torch.empty*; fill float ones with NaN so any element a
    kernel fails to write shows up as a mismatch instead of passing on stale memory."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(empty_like(*a, **kw)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and "kernels" in str(item.path):
            item.add_marker(skip)
