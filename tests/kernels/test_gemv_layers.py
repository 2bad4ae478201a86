"""The fused one-row layer path (``LinearBase.forward_one_row``, ``LlamaMLP.forward_one_row``,
the LM head on the GEMV) vs the unfused layers, on the GEMV kernel (the interpreter on CPU).
The engine takes this path for a lone token on a GPU; these run it on any device."""

import pytest
import torch
from kernel_testing import ULP

from kernels import reference
from vllm_runner.model.layers import embedding, linear
from vllm_runner.model.layers.embedding import ParallelLMHead
from vllm_runner.model.layers.norm import RMSNorm
from vllm_runner.model.layers.quant import Int8WeightOnly, quantize_module
from vllm_runner.model.llama import LlamaMLP

HIDDEN, INTERMEDIATE = 64, 160


def randomize(module: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    module.to(device=device, dtype=dtype)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p, dtype=torch.float32) * p.shape[-1] ** -0.5)


def assert_close_to(out: torch.Tensor, ref: torch.Tensor, ulps: int = 4) -> None:
    """Within a few ulps of the dtype, relative to the largest output (the residual stream
    can cancel the layer's own output)."""
    ref, out = ref.float(), out.float()
    tol = ulps * ULP[torch.bfloat16] * ref.abs().max().item()
    torch.testing.assert_close(out, ref, rtol=0, atol=tol)


@pytest.mark.parametrize("quantized", [False, True], ids=["bf16", "int8"])
def test_mlp_one_row_matches_unfused(device: torch.device, quantized: bool) -> None:
    """stream + down(silu_and_mul(gate_up(norm(stream)))) in two GEMVs (norm, SiLU and the
    residual add inside) equals the norm kernel + the layers' own forward + the add."""
    torch.manual_seed(0)
    mlp, norm = LlamaMLP(HIDDEN, INTERMEDIATE), RMSNorm(HIDDEN, 1e-5)
    randomize(mlp, torch.bfloat16, device)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(HIDDEN) + 0.5)
    norm.to(device=device, dtype=torch.bfloat16)
    if quantized:
        assert quantize_module(mlp, Int8WeightOnly(), device) == 2
    stream = (torch.randn(1, HIDDEN, device=device) * 2 + 0.5).bfloat16()
    with torch.no_grad():
        fused = mlp.forward_one_row(stream, norm)
        normed, _ = reference.rms_norm(stream, norm.weight, norm.eps)
        unfused = (mlp(normed).float() + stream.float()).bfloat16()
    assert fused.shape == (1, HIDDEN) and fused.dtype == torch.bfloat16
    assert_close_to(fused, unfused)


def test_fuses_one_row_needs_a_gpu_row_and_a_readable_weight(
    device: torch.device, monkeypatch: pytest.MonkeyPatch
) -> None:
    layer = linear.ReplicatedLinear(HIDDEN, 32, bias=False)
    randomize(layer, torch.bfloat16, device)
    row = torch.randn(1, HIDDEN, device=device).bfloat16()
    assert layer.fuses_one_row(row) == row.is_cuda
    assert not linear.gemv_takes(torch.cat([row, row]), layer.weight)  # two rows
    assert not linear.gemv_takes(row.float(), layer.weight.float())  # fp32
    monkeypatch.setenv("VLLM_RUNNER_GEMV", "0")
    assert not layer.fuses_one_row(row)


def test_lm_head_one_row_on_the_gemv(device: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    """compute_logits of one row runs the GEMV where gemv_takes says so (a GPU), and gives
    the logits of the matmul."""
    head = ParallelLMHead(1000, HIDDEN)
    randomize(head, torch.bfloat16, device)
    hidden = torch.randn(1, HIDDEN, device=device).bfloat16()
    expected = (hidden.float() @ head.weight.float().T)[:, :1000]
    calls = []

    def takes(x: torch.Tensor, w: torch.Tensor) -> bool:
        calls.append(x.shape)
        return x.shape[0] == 1

    monkeypatch.setattr(embedding, "gemv_takes", takes)
    assert_close_to(head.compute_logits(hidden), expected, ulps=2)
    assert calls == [(1, HIDDEN)]


def tiny_model(family: str, device: torch.device) -> torch.nn.Module:
    """A 2-layer Llama / Qwen2 (q/k/v biases) / Qwen3 (per-head q/k norms, head_dim 32) /
    Phi-3 (partial rotary) in bf16 with random weights and KV caches."""
    from transformers import LlamaConfig, Phi3Config, Qwen2Config, Qwen3Config

    from vllm_runner.model.layers.attention import Attention
    from vllm_runner.model.registry import MODEL_REGISTRY

    shape = {"vocab_size": 384, "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
             "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2}  # fmt: skip
    config = {
        "llama": lambda: LlamaConfig(**shape),
        "qwen2": lambda: Qwen2Config(**shape),
        "qwen3": lambda: Qwen3Config(head_dim=32, **shape),
        "phi3": lambda: Phi3Config(partial_rotary_factor=0.5, **shape),
    }[family]()
    model = MODEL_REGISTRY[type(config).__name__.removesuffix("Config") + "ForCausalLM"](config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name else 0.0))
    model.to(device, torch.bfloat16)
    for attn in model.modules():
        if isinstance(attn, Attention):
            shape = (4, 16, attn.num_kv_heads, attn.head_dim)
            attn.k_cache = torch.zeros(shape, device=device, dtype=torch.bfloat16)
            attn.v_cache = torch.zeros_like(attn.k_cache)
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "phi3"])
def test_decoder_one_row_path_matches_unfused(
    family: str, device: torch.device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three one-token steps through the whole model (layers passing the summed stream,
    the final norm without a residual, Qwen2's q/k/v biases on the GEMV, Qwen3's q/k norms
    after it) equal the unfused layers' hidden states within rounding. ``gemv_takes`` is
    forced so that the CPU takes the path a GPU takes (and a GPU runs both paths)."""
    from vllm_runner.model.layers.attention import AttentionMetadata, forward_context

    def run(fused: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(linear, "gemv_takes", lambda x, w: fused and x.shape[0] == 1)
        model, outs = tiny_model(family, device), []
        row = torch.zeros(1, HIDDEN, device=device).bfloat16()
        assert model.model.layers[0].fuses_one_row(row) == fused
        for pos in range(3):
            md = AttentionMetadata(
                slot_mapping=torch.tensor([pos], device=device),
                block_tables=torch.tensor([[0]], dtype=torch.int32, device=device),
                seq_lens=torch.tensor([pos + 1], dtype=torch.int32, device=device),
                query_start_loc=torch.tensor([0, 1], dtype=torch.int32, device=device),
                max_query_len=1,
                max_seq_len=pos + 1,
            )
            ids, positions = (
                torch.tensor([5 + pos], device=device),
                torch.tensor([pos], device=device),
            )
            with forward_context(md), torch.no_grad():
                outs.append(model(ids, positions))
        return outs

    for fused, unfused in zip(run(True), run(False), strict=True):
        assert_close_to(fused, unfused, ulps=6)
