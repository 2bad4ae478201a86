"""Beam search on a GPU (pytest -m gpu): fp32 on both sides, the beams and their cumulative
logprobs equal HF transformers' ``generate(num_beams=...)`` on the same weights when no end
token is in play (as tests/engine/test_beam_search_engine.py on the CPU)."""

import random

import pytest
import torch

from vllm_runner import LLM, BeamSearchParams

pytestmark = pytest.mark.gpu
VOCAB = 2048


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from transformers import AutoModelForCausalLM, LlamaConfig

    if not torch.cuda.is_available():
        pytest.fail("the gpu suite needs a CUDA device")
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        architectures=["LlamaForCausalLM"],
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # peaked logits: candidates' scores are not near-ties
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 1.0 if "embed" in name or "lm_head" in name else 0.08)
    path = str(tmp_path_factory.mktemp("beam_llama"))
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("width", [2, 4])
def test_beams_equal_hf_generate_on_the_gpu(model_dir, width) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
    llm = LLM(model_dir, device="cuda", dtype="float32", max_model_len=512,
              gpu_memory_utilization=0.2)  # fmt: skip
    rng = random.Random(0)
    batch = [[rng.randrange(VOCAB) for _ in range(rng.randint(3, 40))] for _ in range(4)]
    outs = llm.beam_search(batch, BeamSearchParams(width, max_tokens=10, ignore_eos=True))
    for ids, out in zip(batch, outs, strict=True):
        ref = hf.generate(
            torch.tensor([ids], device="cuda"), num_beams=width, num_return_sequences=width,
            do_sample=False, max_new_tokens=10, min_new_tokens=10, length_penalty=1.0,
            early_stopping=False, output_scores=True, return_dict_in_generate=True,
            pad_token_id=0,
        )  # fmt: skip
        assert [s.output_token_ids for s in out.sequences] == [
            row[len(ids) :] for row in ref.sequences.tolist()
        ]
        for seq, score in zip(out.sequences, ref.sequences_scores.tolist(), strict=True):
            assert seq.cum_logprob == pytest.approx(score * 10, abs=1e-2)
