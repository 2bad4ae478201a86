"""The benchmarks' roofline counts the weight bytes one decode step reads."""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from workloads import weight_numel  # noqa: E402

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
