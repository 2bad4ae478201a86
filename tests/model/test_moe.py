"""Mixture-of-experts models (Mixtral, Qwen3-MoE, Qwen2-MoE, OLMoE) against HF transformers (fp32,
CPU): greedy tokens of batched prompts with chunked prefill and prefix caching, steps in
pieces, both checkpoint layouts of the experts, and what is refused."""

import json
import os
import random

import pytest
import torch
from test_parity import hf_greedy

from vllm_runner import LLM, SamplingParams
from vllm_runner.worker.piecewise_graphs import PiecewiseGraphs

SHAPE = dict(vocab_size=384, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512, tie_word_embeddings=False)  # fmt: skip


def moe_config(family: str, **options):
    """A tiny config of ``family``: 8 experts; Qwen3-MoE with a dense layer (mlp_only_layers)
    and top-3 renormalized, Qwen2-MoE with every other layer sparse, top-2 not renormalized
    (its default) and a shared expert."""
    import transformers

    if family == "mixtral":
        cls, fields = transformers.MixtralConfig, dict(
            intermediate_size=96, num_hidden_layers=2, num_local_experts=8,
            num_experts_per_tok=2, architectures=["MixtralForCausalLM"],
        )  # fmt: skip
    elif family == "qwen3_moe":
        cls, fields = transformers.Qwen3MoeConfig, dict(
            head_dim=32, intermediate_size=128, moe_intermediate_size=48, num_hidden_layers=3,
            num_experts=8, num_experts_per_tok=3, norm_topk_prob=True, mlp_only_layers=[1],
            architectures=["Qwen3MoeForCausalLM"],
        )  # fmt: skip
    elif family == "olmoe":
        cls, fields = transformers.OlmoeConfig, dict(
            intermediate_size=48, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2,
            norm_topk_prob=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            architectures=["OlmoeForCausalLM"],
        )  # fmt: skip
    else:
        cls, fields = transformers.Qwen2MoeConfig, dict(
            intermediate_size=128, moe_intermediate_size=48, shared_expert_intermediate_size=80,
            num_hidden_layers=4, decoder_sparse_step=2, num_experts=8, num_experts_per_tok=2,
            architectures=["Qwen2MoeForCausalLM"],
        )  # fmt: skip
    return cls(**{**SHAPE, **fields, **options})


def save_moe(config, path: str, original_format: bool = True):
    """A random HF model of ``config`` (weights widened so that greedy choices and routes
    are well separated) saved to ``path``: the classic per-expert layout, or transformers'
    stacked one (``save_original_format=False``); returns the HF model."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
            elif "q_norm" in name or "k_norm" in name:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(path, save_original_format=original_format)
    return hf


FAMILIES = ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe"]


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory) -> dict[str, tuple[str, object]]:
    dirs = {}
    for family in FAMILIES:
        path = str(tmp_path_factory.mktemp(family))
        dirs[family] = (path, save_moe(moe_config(family), path))
    return dirs


def _prompts(lengths: list[int], seed: int, prefix: int = 0) -> list[list[int]]:
    """Random prompts; the first ``prefix`` tokens shared by all (prefix-cache hits)."""
    rng = random.Random(seed)
    shared = [rng.randrange(384) for _ in range(prefix)]
    return [shared + [rng.randrange(384) for _ in range(n)] for n in lengths]


def _greedy(num: int) -> SamplingParams:
    return SamplingParams(max_tokens=num, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_greedy_tokens_match_hf(family, moe_dirs):
    """Eight prompts batched, steps of 64 tokens (long prompts prefill in chunks), prefix
    caching on (a second batch shares 40 tokens with the first): HF's greedy tokens."""
    path, hf = moe_dirs[family]
    llm = LLM(path, dtype="float32", device="cpu", cpu_kv_cache_gb=0.05,
              max_num_batched_tokens=64, enable_prefix_caching=True)  # fmt: skip
    for seed in (1, 2):
        batch = _prompts([3, 90, 17, 150, 1, 33, 64, 8], seed=1, prefix=40)
        if seed == 2:
            batch = [p[:40] + q for p, q in zip(batch, _prompts([5] * 8, seed=2), strict=True)]
        outs = llm.generate(batch, _greedy(12))
        assert [o.token_ids for o in outs] == [hf_greedy(hf, p, 12) for p in batch]
    assert llm.engine.stats()["prefix_cache_hits"] > 0


def test_steps_in_pieces_match_hf(moe_dirs, monkeypatch):
    """Steps that prefill run in the piecewise graphs' pieces (eager on the CPU: what a GPU
    captures, the MoE blocks inside the pieces): HF's tokens."""
    runs = []
    run = PiecewiseGraphs.run
    monkeypatch.setattr(PiecewiseGraphs, "run", lambda self, *a: runs.append(a[1]) or run(self, *a))
    path, hf = moe_dirs["qwen3_moe"]
    llm = LLM(path, dtype="float32", device="cpu", cpu_kv_cache_gb=0.05,
              max_num_batched_tokens=96, piecewise_max_tokens=128)  # fmt: skip
    batch = _prompts([5, 40, 61, 17, 90], seed=3)
    outs = llm.generate(batch, _greedy(10))
    assert [o.token_ids for o in outs] == [hf_greedy(hf, p, 10) for p in batch]
    assert runs


@pytest.mark.parametrize("family", FAMILIES)
def test_stacked_expert_checkpoints_load_the_same_weights(family, moe_dirs, tmp_path):
    """transformers' stacked layout (``mlp.experts.gate_up_proj`` [E, 2I, H],
    ``mlp.experts.down_proj``; Mixtral's block as ``mlp``) loads the classic layout's
    parameters exactly, and generates HF's tokens."""
    from safetensors import safe_open
    from transformers import AutoConfig

    from vllm_runner.model.loader import iterate_weights, load_weights
    from vllm_runner.model.registry import resolve_model_class

    classic, hf = moe_dirs[family]
    save_moe(moe_config(family), str(tmp_path), original_format=False)
    with safe_open(os.path.join(tmp_path, "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert any(n.endswith(".mlp.experts.gate_up_proj") for n in names)
    assert not any(".experts.0." in n for n in names)
    config = AutoConfig.from_pretrained(classic)

    def loaded(path: str) -> dict[str, torch.Tensor]:
        model = resolve_model_class(config)(config)
        load_weights(model, iterate_weights(path))
        return dict(model.named_parameters())

    want, got = loaded(classic), loaded(str(tmp_path))
    assert got.keys() == want.keys() and any(n.endswith("experts.w13") for n in got)
    for name, param in got.items():
        assert torch.equal(param, want[name]), name
    llm = LLM(str(tmp_path), dtype="float32", device="cpu", cpu_kv_cache_gb=0.05)
    batch = _prompts([7, 30], seed=4)
    assert [o.token_ids for o in llm.generate(batch, _greedy(8))] == [
        hf_greedy(hf, p, 8) for p in batch
    ]


def _rewrite_checkpoint(src: str, dst: str, edit) -> str:
    """``src``'s config and weights with ``edit`` applied to the {name: tensor} dict."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(os.path.join(src, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return dst


def test_a_missing_expert_tensor_is_named(moe_dirs, tmp_path):
    path, _ = moe_dirs["mixtral"]
    name = "model.layers.1.block_sparse_moe.experts.5.w3.weight"
    path = _rewrite_checkpoint(path, str(tmp_path), lambda t: t.pop(name))
    with pytest.raises(ValueError, match=r"^checkpoint lacks 1 tensors, e\.g\. "
                       r"\[\"model\.layers\.1\.mlp\.experts\.w13\['up', 5\]\"\]$"):  # fmt: skip
        LLM(path, dtype="float32", device="cpu", cpu_kv_cache_gb=0.05)


def test_an_expert_tensor_of_another_shape_is_named(moe_dirs, tmp_path):
    path, _ = moe_dirs["qwen3_moe"]
    name = "model.layers.0.mlp.experts.2.down_proj.weight"

    def cut(tensors: dict) -> None:
        tensors[name] = tensors[name][:, :40].contiguous()

    path = _rewrite_checkpoint(path, str(tmp_path), cut)
    with pytest.raises(ValueError, match=rf"^checkpoint tensor '{name}' has shape \(64, 40\), "
                       r"\(64, 48\) expected$"):  # fmt: skip
        LLM(path, dtype="float32", device="cpu", cpu_kv_cache_gb=0.05)


@pytest.mark.parametrize(
    "option, message",
    [
        (dict(quantization="int8"), r"^quantization='int8' is not supported for "
         r"MixtralForCausalLM \(a mixture of experts: .*use quantization=None$"),
        (dict(cpu_offload_gb=0.01), r"^cpu_offload_gb=0\.01 is not supported for "
         r"MixtralForCausalLM \(a mixture of experts: .*use cpu_offload_gb=0$"),
    ],
)  # fmt: skip
def test_quantization_and_offloading_are_refused(moe_dirs, option, message):
    path, _ = moe_dirs["mixtral"]
    with pytest.raises(ValueError, match=message):
        LLM(path, dtype="float32", device="cpu", cpu_kv_cache_gb=0.05, **option)


@pytest.mark.parametrize(
    "family, options, message",
    [
        ("mixtral", dict(num_experts_per_tok=9),
         r"^num_experts_per_tok=9 must be in \[1, num_local_experts=8\]$"),
        ("qwen3_moe", dict(decoder_sparse_step=0),
         r"^decoder_sparse_step=0 must be an integer >= 1$"),
        ("qwen2_moe", dict(hidden_act="gelu"),
         r"^hidden_act 'gelu' is not supported by Qwen2MoeForCausalLM"),
        ("olmoe", dict(clip_qkv=8.0),
         r"^clip_qkv=8\.0 is not supported by OlmoeForCausalLM \(only None\)$"),
    ],
)  # fmt: skip
def test_unsupported_configs_are_refused(family, options, message, tmp_path):
    from vllm_runner.model.registry import resolve_model_class

    config = moe_config(family, **options)
    with pytest.raises(ValueError, match=message):
        resolve_model_class(config)(config)
