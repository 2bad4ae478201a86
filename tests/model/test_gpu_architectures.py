"""GPU checks of Qwen3 and Phi-3 (run on the device machine: pytest -m gpu): bf16 close to HF
on every CUDA path (batched prefill and decode, the lone request's fused one-row layers,
decode CUDA graphs), and fp32 equal to the CPU reference path (the fused decode kernel's
rotary, the rotary cache write, piecewise graphs) for Qwen3's q/k norms and Phi-3's LongRoPE
over a partial rotary. tests/model/test_gpu.py runs the same checks on a Llama."""

import random

import pytest
import torch
from test_gpu import first_difference_in_top5

from vllm_runner import LLM, SamplingParams

pytestmark = pytest.mark.gpu
NUM_NEW = 32  # (first_difference_in_top5's, test_gpu.NUM_NEW)
FAMILIES = ["qwen3", "phi3"]


def _config(family: str, vocab: int, hidden: int, layers: int, original: int, positions: int):
    """Qwen3: head_dim 128 (not hidden / heads), GQA 4:1, tied embeddings. Phi-3: Phi-4-mini's
    layout (head_dim 96, partial_rotary_factor 0.75: 72 features rotate) with LongRoPE
    (``original`` positions of ``positions``)."""
    from transformers import Phi3Config, Qwen3Config

    shape = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                 num_hidden_layers=layers, max_position_embeddings=positions)  # fmt: skip
    if family == "qwen3":
        return Qwen3Config(num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                           tie_word_embeddings=True, architectures=["Qwen3ForCausalLM"],
                           **shape)  # fmt: skip
    half = int(hidden // 8 * 0.75) // 2
    rope = {"type": "longrope", "short_factor": [1.0 + 0.02 * i for i in range(half)],
            "long_factor": [1.0 + 0.5 * i for i in range(half)]}  # fmt: skip
    return Phi3Config(num_attention_heads=8, num_key_value_heads=4, partial_rotary_factor=0.75,
                      rope_scaling=rope, original_max_position_embeddings=original,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      architectures=["Phi3ForCausalLM"], **shape)  # fmt: skip


def _save(config, path, dtype: torch.dtype, other_std: float) -> str:
    """Random weights with peaked logits (embedding std 1.0), Qwen3's q/k norm weights unlike
    per feature, saved to ``path``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 1.0 if "embed" in name else other_std)
            elif "q_norm" in name or "k_norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module", params=FAMILIES)
def bf16_model(request, tmp_path_factory) -> tuple[str, str]:
    """(family, folder): bf16, 16 layers; Phi-3's LongRoPE with 1,024 original positions of
    4,096."""
    if not torch.cuda.is_available():
        pytest.fail("the gpu suite needs a CUDA device")
    config = _config(request.param, 32768, 768, 16, original=1024, positions=4096)
    path = tmp_path_factory.mktemp(request.param)
    return request.param, _save(config, path, torch.bfloat16, 0.05)


def gpu_llm(path: str, **kw) -> LLM:
    """max_model_len 1,024: Phi-3's short factors, as HF's for sequences within them."""
    kw.setdefault("gpu_memory_utilization", 0.2)
    return LLM(path, device="cuda", dtype=kw.pop("dtype", "bfloat16"), max_model_len=1024, **kw)


def prompts(vocab: int = 32768) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(vocab) for _ in range(rng.randint(2, 300))] for _ in range(12)]


def test_bf16_greedy_close_to_hf(bf16_model):
    """A batch (prefill, batched decode in CUDA graphs): HF's greedy tokens, or where they
    first differ each side's token is among the other's top-5 (bf16 near-ties)."""
    from transformers import AutoModelForCausalLM

    _, path = bf16_model
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    params = SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True, logprobs=5)
    batch = prompts()
    for prompt, out in zip(batch, gpu_llm(path).generate(batch, params), strict=True):
        first_difference_in_top5(hf, prompt, out)


def test_lone_request_fused_layers(bf16_model, monkeypatch):
    """A request decoding alone runs its layers on the one-row GEMVs (input norms inside);
    Qwen3's q / k norms run after the qkv GEMV, one row of heads each, before the attention
    (which rotates): close to HF, and CUDA graphs give the eager engine's tokens."""
    from transformers import AutoModelForCausalLM

    import kernels.gemv
    import kernels.rms_norm

    gemvs, head_norms = [], []
    fused, norm = kernels.gemv.linear_one_row, kernels.rms_norm.rms_norm

    def spy_gemv(*args, **kw):
        gemvs.append(kw.get("norm") is not None)
        return fused(*args, **kw)

    def spy_norm(x, weight, *args):
        if x.dim() == 3 and x.shape[0] == 1:  # [1 token, heads, head_dim]
            head_norms.append(x.shape[1])
        return norm(x, weight, *args)

    monkeypatch.setattr(kernels.gemv, "linear_one_row", spy_gemv)
    monkeypatch.setattr(kernels.rms_norm, "rms_norm", spy_norm)
    family, path = bf16_model
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    params = SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True, logprobs=5)
    graphs = gpu_llm(path)
    eager = gpu_llm(path, enforce_eager=True)
    steps = NUM_NEW - 1  # decode steps (an overlapped step may add one)
    for prompt in prompts()[:4]:
        gemvs.clear()
        head_norms.clear()
        (out,) = eager.generate([prompt], params)
        # 16 layers x 4 GEMVs a decode step (+ the LM head), norms inside qkv and gate_up
        assert len(gemvs) >= (16 * 4 + 1) * steps and sum(gemvs) >= 16 * 2 * steps
        if family == "qwen3":  # per decode step and layer: q's 8 heads, then k's 2
            assert len(head_norms) >= 2 * 16 * steps and head_norms[:2] == [8, 2]
            assert set(head_norms) == {8, 2}
        else:
            assert not head_norms
        assert graphs.generate([prompt], params)[0].token_ids == out.token_ids
        first_difference_in_top5(hf, prompt, out)


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_on_the_gpu_matches_the_cpu(family, tmp_path):
    """fp32 on both sides, so that the kernels and the CPU reference round alike: the same
    greedy tokens for a batch (prefill, decode graphs: the fused decode kernel rotates the
    new key), for a lone request, and with prompts chunked through captured piecewise graphs.
    Phi-3's prompts pass its 256 original positions (the long factors of an engine serving
    1,024)."""
    path = _save(_config(family, 4096, 256, 4, original=256, positions=1024), tmp_path,
                 torch.float32, 0.1)  # fmt: skip
    params = SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)
    batch = [[t % 4096 for t in p] for p in prompts()[:8]]
    batch = [p * (1 + 300 // len(p)) for p in batch]  # past 256 positions
    cpu = LLM(path, dtype="float32", device="cpu", num_kv_blocks=512)
    want = [o.token_ids for o in cpu.generate(batch, params)]
    settings = [{}, {"max_num_batched_tokens": 256, "piecewise_max_tokens": 256}]
    for kw in settings:
        gpu = LLM(path, dtype="float32", device="cuda", num_kv_blocks=512, **kw)
        assert [o.token_ids for o in gpu.generate(batch, params)] == want, kw
        assert gpu.generate(batch[:1], params)[0].token_ids == want[0], kw
        del gpu
