"""benchmarks/throughput.py credits each system with the output tokens it really returned."""

import importlib.util
import sys
from pathlib import Path

import pytest

_BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def throughput():
    """benchmarks/throughput.py loaded from its file; sys.path as it was afterwards.

    NOTE: the script puts benchmarks/ on sys.path to import workloads.py; left there, its
    kernels.py would shadow the kernels package for every later import."""
    path, modules = list(sys.path), set(sys.modules)
    spec = importlib.util.spec_from_file_location("bench_throughput", _BENCH / "throughput.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # (dataclasses)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = path
        if "workloads" not in modules:
            sys.modules.pop("workloads", None)
    return module


def test_output_tokens_are_those_returned_not_those_requested(throughput, tmp_path, monkeypatch):
    """A system that returns half of each prompt's tokens (e.g. generate_batch, which logs a
    failed request and returns what it had) is credited with half, and the note says so."""

    def half(model_dir, wl, warm, args):
        return [2.0], [[7] * (m // 2) for m in wl.max_tokens], None, "fake"

    monkeypatch.setitem(throughput.SYSTEMS, "hf", half)
    argv = ["--models", "tiny", "--quick", "--systems", "hf", "--model-root", str(tmp_path)]
    args = throughput.parse_args(argv)
    report = {"copy_bandwidth_GBps": 1.0, "batch1": [], "greedy_agreement_first16": {}}
    [result] = throughput.bench_model("tiny", args, report)
    requested = 8 * 16  # --quick W1: 8 prompts, 16 new tokens each
    assert result.output_tokens == requested // 2
    assert result.tok_s == requested // 2 / 2.0
    assert f"{requested // 2} of {requested} requested tokens not returned" in result.note
    assert "8 prompts with wrong output length" in result.note


@pytest.mark.parametrize(("flag", "value"), [("--repeats", "0"), ("--num-prompts", "0")])
def test_counts_below_one_are_refused_at_the_command_line(throughput, capsys, flag, value):
    """--repeats 0 ended in a TypeError after every model had loaded; --num-prompts 0 ran the
    default count instead."""
    with pytest.raises(SystemExit):
        throughput.parse_args([flag, value])
    assert f"{flag} must be >= 1, got {value}" in capsys.readouterr().err
