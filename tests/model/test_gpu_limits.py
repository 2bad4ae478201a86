"""GPU: a prompt that fills max_model_len (offline ``LLM``: one new token, as vLLM's)."""

import pytest
import torch

from vllm_runner import LLM, SamplingParams

pytestmark = pytest.mark.gpu
DEVICE = "cuda"


@pytest.mark.parametrize("chunk", [None, 16], ids=["whole", "chunked"])
@pytest.mark.parametrize("eager", [False, True], ids=["graphs", "eager"])
def test_a_prompt_of_max_model_len_tokens(tmp_path, chunk, eager) -> None:
    """64 prompt tokens, max_model_len 64 (four whole KV blocks, the last position
    prefilled): one new token, finish_reason length, HF's next token (fp32)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        architectures=["LlamaForCausalLM"],
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(tmp_path)
    prompt = torch.randint(0, 512, (64,)).tolist()
    with torch.no_grad():
        top2 = model(torch.tensor([prompt])).logits[0, -1].topk(2)
    assert top2.values[0] - top2.values[1] > 1e-3, "a near tie: pick another seed"
    kw = {"max_num_batched_tokens": chunk} if chunk else {}
    llm = LLM(str(tmp_path), device=DEVICE, dtype="float32", max_model_len=64,
              gpu_memory_utilization=0.1, enforce_eager=eager, **kw)  # fmt: skip
    (out,) = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0))
    assert out.outputs[0].token_ids == [top2.indices[0].item()]
    assert out.outputs[0].finish_reason == "length"
