"""The benchmarks' roofline counts the weight bytes one decode step reads."""

import importlib.util
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

# NOTE: loaded from its file, not by putting benchmarks/ on sys.path: there its kernels.py
# would shadow the kernels package for every later import, spawned engine processes too.
_spec = importlib.util.spec_from_file_location(
    "bench_workloads", Path(__file__).resolve().parents[2] / "benchmarks" / "workloads.py"
)
workloads = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)  # (dataclasses)
_spec.loader.exec_module(workloads)
weight_numel = workloads.weight_numel

VOCAB, HIDDEN = 64, 8


def test_roofline_bytes_leave_out_an_untied_embedding_table(tmp_path):
    """A decode step looks up one embedding row a token; the LM head it reads whole. Untied
    (the 8B shape), the table is not counted; tied (1B, SmolLM2), its one copy is the head."""
    layer = {"model.layers.0.mlp.down_proj.weight": torch.zeros(HIDDEN, HIDDEN)}
    embed = {"model.embed_tokens.weight": torch.zeros(VOCAB, HIDDEN)}
    untied, tied = tmp_path / "untied", tmp_path / "tied"
    untied.mkdir(), tied.mkdir()
    head = {"lm_head.weight": torch.zeros(VOCAB, HIDDEN)}
    save_file({**layer, **embed, **head}, untied / "model.safetensors")
    save_file({**layer, **embed}, tied / "model.safetensors")  # tied: stored once
    assert weight_numel(str(untied)) == HIDDEN * HIDDEN + VOCAB * HIDDEN
    assert weight_numel(str(tied)) == HIDDEN * HIDDEN + VOCAB * HIDDEN
