"""Embedding checkpoints as they are published: the bare decoder's weights (Qwen3-Embedding's
"embed_tokens.weight", "layers.0....", "norm.weight": no "model." prefix), with the LM head
tied (Qwen3-Embedding-0.6B) or missing though untied (Qwen3-Embedding-8B); and embeddings
through an engine process (its front end gets the EmbeddingRequestOutput, its own id)."""

import asyncio
import json
import os
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from vllm_runner import LLM, AsyncLLM, SamplingParams


def save_bare_qwen3(path: str, tied: bool, architectures: list[str]) -> str:
    """A random tiny Qwen3 saved as transformers' AutoModel saves it (Qwen3Model), its
    config.json naming ``architectures``."""
    from transformers import AutoModel, Qwen3Config

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=384, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=32, max_position_embeddings=512,
                         tie_word_embeddings=tied)  # fmt: skip
    model = AutoModel.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
            elif "q_norm" in name or "k_norm" in name:
                p.uniform_(0.5, 1.5)
    model.eval().save_pretrained(path)
    with open(os.path.join(path, "config.json")) as f:
        saved = json.load(f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**saved, "architectures": architectures}, f)
    return path


def hf_last_normed(path: str, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return F.normalize(model(torch.tensor([ids])).last_hidden_state[0, -1], dim=-1)


def stored_names(path: str) -> set[str]:
    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("architecture", ["Qwen3ForCausalLM", "Qwen3Model"])
def test_an_untied_checkpoint_without_lm_head_serves_embeddings_only(tmp_path, architecture):
    path = save_bare_qwen3(str(tmp_path), tied=False, architectures=[architecture])
    names = stored_names(path)
    assert "norm.weight" in names and "layers.0.self_attn.q_proj.weight" in names
    assert not any(n.startswith("model.") or n.startswith("lm_head") for n in names)
    llm = LLM(path, dtype="float32", device="cpu", cpu_kv_cache_gb=0.05)
    ids = list(range(10, 40))
    got = torch.tensor(llm.embed(ids)[0].outputs.embedding)
    torch.testing.assert_close(got, hf_last_normed(path, ids), rtol=1e-5, atol=1e-5)
    message = (f"model {path!r} has no LM head (its checkpoint holds no lm_head.weight): it "
               "serves embeddings only, not generation")  # fmt: skip
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        llm.generate([ids], SamplingParams(max_tokens=4))
    assert llm.stats()["kv_blocks_used"] == 0


def test_a_tied_bare_checkpoint_embeds_and_generates_as_hf(tmp_path):
    from transformers import AutoModelForCausalLM

    path = save_bare_qwen3(str(tmp_path), tied=True, architectures=["Qwen3ForCausalLM"])
    assert not any(n.startswith("model.") for n in stored_names(path))
    llm = LLM(path, dtype="float32", device="cpu", cpu_kv_cache_gb=0.05)
    ids = list(range(50, 70))
    got = torch.tensor(llm.embed(ids)[0].outputs.embedding)
    torch.testing.assert_close(got, hf_last_normed(path, ids), rtol=1e-5, atol=1e-5)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, 20:]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    assert llm.generate([ids], params)[0].token_ids == want.tolist()


def test_an_engine_process_returns_embeddings_under_the_callers_ids(llama_dir):
    ids = [list(range(3, 30)), list(range(40, 45))]
    want = LLM(llama_dir, dtype="float32", device="cpu", cpu_kv_cache_gb=0.05).embed(ids)

    async def main():
        async with AsyncLLM(llama_dir, dtype="float32", device="cpu", cpu_kv_cache_gb=0.05,
                            engine_process=True) as llm:  # fmt: skip
            outs = await asyncio.gather(*(llm.embed(p, request_id=f"e{i}")
                                          for i, p in enumerate(ids)))  # fmt: skip
            return outs, llm.stats()

    outs, stats = asyncio.run(main())
    assert [o.request_id for o in outs] == ["e0", "e1"]
    assert [o.prompt_token_ids for o in outs] == ids
    for got, expected in zip(outs, want, strict=True):
        torch.testing.assert_close(
            torch.tensor(got.outputs.embedding),
            torch.tensor(expected.outputs.embedding),
            rtol=1e-5,
            atol=1e-5,
        )
    assert stats["kv_blocks_used"] == 0
