"""Greedy parity with HF transformers (fp32, CPU) on the same weights."""

import random

import pytest
import torch

from vllm_runner import LLM, SamplingParams

NUM_NEW = 32


def hf_greedy(model, prompt: list[int], num_new: int) -> list[int]:
    """HF's own greedy decoding (its KV cache, its forward), never stopping at EOS."""
    ids = torch.tensor([prompt])
    out, past = [], None
    with torch.no_grad():
        for _ in range(num_new):
            result = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = result.past_key_values
            token = int(result.logits[0, -1].argmax())
            out.append(token)
            ids = torch.tensor([[token]])
    return out


def random_prompts(num: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(3, 70))] for _ in range(num)]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "phi3", "opt"])
def test_tiny_models_match_hf(family, tiny_model_dirs):
    from transformers import AutoModelForCausalLM

    path = tiny_model_dirs[family]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = random_prompts(10, hf.config.vocab_size, seed=1)
    llm = LLM(path, dtype="float32", device="cpu", cpu_kv_cache_gb=0.05)
    outs = llm.generate(
        prompts, SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)
    )
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.prompt_token_ids == prompt
        assert out.token_ids == hf_greedy(hf, prompt, NUM_NEW)
        assert out.finish_reason == "length"
        assert out.text == ""  # no tokenizer in the folder: ids only


def test_default_model_matches_hf(smol_llm, default_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    hf = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    texts = [
        "The capital of France is",
        "Hi",
        "Write a haiku about the sea.",
        "1, 2, 3, 4,",
        "def fibonacci(n):",
        "Once upon a time in a small village there",
        "The quick brown fox",
        "Explain the benefits of AI in healthcare in detail, please.",
    ]
    outs = smol_llm.generate(
        texts, SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)
    )
    for text, out in zip(texts, outs, strict=True):
        prompt = tok.encode(text)
        assert out.prompt_token_ids == prompt
        expected = hf_greedy(hf, prompt, NUM_NEW)
        assert out.token_ids == expected
        assert out.text == tok.decode(expected, skip_special_tokens=True)
    assert outs[0].text.startswith(" Paris.")


def saved_random_model(config, path):
    """An HF model of ``config`` with weights large enough to give peaked logits, saved to
    ``path`` and read back from it (what the engine loads)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    hf.save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 64},
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "dynamic", "factor": 2.0},  # within max_position_embeddings
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
         "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 16, "truncate": False},
    ],
)  # fmt: skip
def test_rope_scalings_match_hf(tmp_path, scaling):
    """Each rope scaling's cos / sin table equals HF's rotary embedding (YaRN's attention
    factor included), and greedy tokens past the original context equal HF's."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, rope_theta=10000.0,
                         rope_parameters={"rope_theta": 10000.0, **scaling},
                         tie_word_embeddings=False, architectures=["LlamaForCausalLM"])  # fmt: skip
    hf = saved_random_model(config, tmp_path)
    assert hf.config.rope_parameters["rope_type"] == scaling["rope_type"]
    llm = LLM(str(tmp_path), dtype="float32", device="cpu", cpu_kv_cache_gb=0.05)
    # (the linear table extends past 512: its first 512 rows)
    table = llm.engine.runner.model.model.layers[0].self_attn.rotary_emb.cos_sin_cache[:512]
    positions = torch.arange(512)[None]
    cos, sin = hf.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
    half = table.shape[1] // 2  # (HF multiplies positions by frequencies in fp32 here)
    torch.testing.assert_close(table[:, :half], cos[0, :, :half], rtol=0, atol=5e-5)
    torch.testing.assert_close(table[:, half:], sin[0, :, :half], rtol=0, atol=5e-5)
    prompts = [[random.Random(i).randrange(384) for _ in range(200 + 40 * i)] for i in range(3)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == hf_greedy(hf, prompt, 16)


def assert_serves_past_max_positions(config, path, positions: int, lengths: list[int]) -> None:
    """The model of ``config`` serves ``positions`` (its max_model_len): prompts of
    ``lengths`` (past max_position_embeddings) get HF's greedy tokens, and a max_model_len
    past ``positions`` is refused naming the limit."""
    hf = saved_random_model(config, path)
    llm = LLM(str(path), dtype="float32", device="cpu", cpu_kv_cache_gb=0.05)
    assert llm.engine.limits.max_model_len == positions
    prompts = [[random.Random(i).randrange(384) for _ in range(n)] for i, n in enumerate(lengths)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == hf_greedy(hf, prompt, 8)
    too_long = positions + 88
    with pytest.raises(
        ValueError, match=f"max_model_len={too_long} exceeds the model's {positions} positions"
    ):
        LLM(str(path), dtype="float32", device="cpu", max_model_len=too_long)


def test_yarn_extends_the_context_past_max_position_embeddings(tmp_path):
    """Qwen2.5's long context: max_position_embeddings stays the original 256 and YaRN's
    factor 4 serves 1,024 positions (as vLLM reads it). The engine takes prompts past 256
    and gives HF's greedy tokens; past 1,024 it refuses, naming the limit."""
    from transformers import Qwen2Config

    yarn = {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 256,
    }
    config = Qwen2Config(vocab_size=384, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, rope_parameters=yarn,
                         tie_word_embeddings=True, architectures=["Qwen2ForCausalLM"])  # fmt: skip
    assert_serves_past_max_positions(config, tmp_path, 1024, [300, 600])


def _variant_config(family: str, **options):
    from transformers import LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

    shape = dict(vocab_size=384, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=512)  # fmt: skip
    if family == "opt":
        return OPTConfig(ffn_dim=128, architectures=["OPTForCausalLM"], **shape, **options)
    config_cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
    architecture = f"{config_cls.__name__.removesuffix('Config')}ForCausalLM"
    return config_cls(intermediate_size=128, num_key_value_heads=2,
                      architectures=[architecture], **shape, **options)  # fmt: skip


@pytest.mark.parametrize(
    "family, options",
    [
        # head_dim given, not hidden / heads (Mistral-Nemo, Qwen3's layout); biases; tied
        ("llama", dict(head_dim=32, attention_bias=True, mlp_bias=True,
                       tie_word_embeddings=True,
                       rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
        ("mistral", dict(head_dim=8, sliding_window=None, tie_word_embeddings=False)),
        ("qwen2", dict(head_dim=32, tie_word_embeddings=False)),
        # OPT-350m's layout: a smaller embedding projected in and out, norms after
        ("opt", dict(word_embed_proj_dim=32, do_layer_norm_before=False)),
        ("opt", dict(enable_bias=False, layer_norm_elementwise_affine=False,
                     activation_function="gelu", tie_word_embeddings=False)),
        # checkpoints fine-tuned before transformers 4.20.1: no final norm; a tanh GELU
        ("opt", dict(_remove_final_layer_norm=True, activation_function="gelu_new")),
    ],
)  # fmt: skip
def test_config_variants_match_hf(tmp_path, family, options):
    hf = saved_random_model(_variant_config(family, **options), tmp_path)
    for name, value in options.items():  # the option reached the saved config
        assert getattr(hf.config, name, value) == value, name
    prompts = random_prompts(4, 384, seed=2)
    llm = LLM(str(tmp_path), dtype="float32", device="cpu", cpu_kv_cache_gb=0.05)
    outs = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == hf_greedy(hf, prompt, 16)


def test_linear_rope_scaling_extends_the_context_by_its_factor(tmp_path):
    """Linear position interpolation (vicuna-7b-v1.5-16k: max_position_embeddings 4096,
    factor 4) serves max_position_embeddings x factor positions, as vLLM reads it; HF's
    positions past max_position_embeddings are the same interpolation, and its greedy tokens
    there equal the engine's."""
    from transformers import LlamaConfig

    linear = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    config = LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, rope_parameters=linear,
                         architectures=["LlamaForCausalLM"])  # fmt: skip
    assert_serves_past_max_positions(config, tmp_path, 512, [200, 450])


def _rotary_table_matches_hf(llm, hf, positions: int) -> None:
    """The engine's cos / sin table equals HF's rotary embedding over ``positions``."""
    table = llm.engine.runner.model.model.layers[0].self_attn.rotary_emb.cos_sin_cache
    cos, sin = hf.model.rotary_emb(torch.zeros(1), torch.arange(positions)[None])
    half = table.shape[1] // 2
    torch.testing.assert_close(table[:positions, :half], cos[0, :, :half], rtol=0, atol=5e-5)
    torch.testing.assert_close(table[:positions, half:], sin[0, :, :half], rtol=0, atol=5e-5)


@pytest.mark.parametrize(
    "rope_theta, rope_scaling",
    [
        (500000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        (10000.0, {"type": "linear", "factor": 2.0}),
        (1000000.0, None),
    ],
)  # fmt: skip
def test_transformers4_rope_layout_matches_hf(tmp_path, rope_theta, rope_scaling):
    """config.json as Hub checkpoints saved by transformers 4 hold it (Llama-3.1, Qwen2.5,
    vicuna-16k): a top-level rope_theta and a rope_scaling dict keyed "rope_type" or "type",
    no rope_parameters. The engine reads the same theta and scaling as HF."""
    import json

    from transformers import AutoModelForCausalLM

    saved_random_model(_variant_config("llama"), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("rope_parameters", None)
    config.update(rope_theta=rope_theta, rope_scaling=rope_scaling)
    (tmp_path / "config.json").write_text(json.dumps(config))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert hf.config.rope_parameters["rope_theta"] == rope_theta
    llm = LLM(str(tmp_path), dtype="float32", device="cpu", cpu_kv_cache_gb=0.05)
    _rotary_table_matches_hf(llm, hf, 512)
    prompts = [[random.Random(i).randrange(384) for _ in range(n)] for i, n in enumerate([9, 300])]
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == hf_greedy(hf, prompt, 8)


@pytest.mark.parametrize(
    "heads, kv_heads, stored",
    [(4, 4, torch.float32), (8, 1, torch.float32), (8, 2, torch.bfloat16)],
)
def test_gqa_ratios_and_a_bf16_checkpoint_match_hf(tmp_path, heads, kv_heads, stored):
    """Multi-head (1:1) and 8:1 grouped-query attention; a checkpoint stored in bf16 (as
    most Hub checkpoints are) loaded into fp32 as HF loads it."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, max_position_embeddings=512,
                         architectures=["LlamaForCausalLM"])  # fmt: skip
    saved_random_model(config, tmp_path).to(stored).save_pretrained(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    prompts = random_prompts(3, 384, seed=3)
    llm = LLM(str(tmp_path), dtype="float32", device="cpu", cpu_kv_cache_gb=0.05)
    outs = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == hf_greedy(hf, prompt, 16)


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3", "opt"])
def test_chunked_prefill_and_prefix_hits_match_hf(family, tiny_model_dirs):
    """Steps of 7 tokens over blocks of 8 (every chunk and the decode cross block
    boundaries), then the same prompts again starting from cached blocks: HF's tokens each
    time (OPT: its learned positions at a cached prefix's offset)."""
    from transformers import AutoModelForCausalLM

    path = tiny_model_dirs[family]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    shared = [random.Random(4).randrange(384) for _ in range(45)]
    prompts = [shared + [random.Random(i).randrange(384) for _ in range(i * 5)] for i in range(4)]
    llm = LLM(path, dtype="float32", device="cpu", cpu_kv_cache_gb=0.05,
              max_num_batched_tokens=7, block_size=8)  # fmt: skip
    expected = [hf_greedy(hf, prompt, 12) for prompt in prompts]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    for _ in range(2):
        outs = llm.generate(prompts, params)
        assert [out.token_ids for out in outs] == expected
    assert [out.num_cached_tokens for out in outs] == [40, 48, 48, 56]
