"""guided_choice end to end on the default model (CPU), with synchronous steps and with async
scheduling (whose newest sampled token is still on the device when the next step samples):
every output is one choice's tokens then an end token; greedy takes, at each step, the best of
the allowed tokens by HF transformers' logits on the same weights."""

import pytest
import torch
from engine_testing import make_llm

from vllm_runner import SamplingParams
from vllm_runner.sample.guided_choice import allowed_next, choice_token_ids

PROMPT = "The capital of France is"
# " Paris" is a choice and the start of another: after it, an end token or ","
CHOICES = [" Paris", " London", " Paris, France", " the city of Berlin"]


def _greedy_by_hf(hf, tok, prompt: str, choices: list[str], ends: list[int]) -> list[int]:
    sequences = choice_token_ids(tok, choices)
    ids, out = tok.encode(prompt), []
    while not out or out[-1] not in ends:
        allowed = [t for t, _ in allowed_next(sequences, out, False, ends)]
        with torch.no_grad():
            logits = hf(torch.tensor([ids + out])).logits[0, -1]
        out.append(max(allowed, key=lambda t: logits[t].item()))
    return out


@pytest.mark.parametrize("steps", ["sync", "async"])
@pytest.mark.parametrize(
    "choices", [CHOICES, [" London", " the city of Berlin"], [" yes", " no"]], ids=str
)
def test_greedy_takes_the_best_allowed_token_each_step(smol_engines, hf_smol, steps, choices):
    llm = smol_engines[steps]
    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=20, guided_choice=choices)
    out = llm.generate([PROMPT], params)[0].outputs[0]
    ends = sorted(llm.engine.eos_ids)  # the model's EOS ids
    assert list(out.token_ids) == _greedy_by_hf(hf_smol, tok, PROMPT, choices, ends)
    assert out.text in choices and out.finish_reason == "stop"


@pytest.mark.parametrize("steps", ["sync", "async"])
def test_every_sampled_output_is_a_choice_then_an_end(smol_engines, steps) -> None:
    llm = smol_engines[steps]
    sequences = choice_token_ids(llm.get_tokenizer(), CHOICES)
    params = SamplingParams(temperature=1.5, n=24, seed=0, max_tokens=20, guided_choice=CHOICES)
    outs = llm.generate([PROMPT], params)[0].outputs
    for out in outs:
        *body, end = out.token_ids
        assert tuple(body) in sequences and end in llm.engine.eos_ids, out.token_ids
        assert out.text in CHOICES and out.finish_reason == "stop"
    assert len({o.text for o in outs}) > 1  # (a hot temperature: not one choice every time)


def test_a_stop_token_id_ends_a_choice_too(smol_engines) -> None:
    """The end tokens are the model's EOS ids and the request's stop_token_ids."""
    llm = smol_engines["sync"]
    [comma] = llm.get_tokenizer().encode(",", add_special_tokens=False)
    params = SamplingParams(temperature=0.0, max_tokens=20, guided_choice=[" Paris"],
                            stop_token_ids=[comma], logit_bias={comma: 100.0})  # fmt: skip
    out = llm.generate([PROMPT], params)[0].outputs[0]
    assert out.text == " Paris" and out.stop_reason == comma


def test_a_choice_cut_by_max_tokens_ends_by_length(smol_engines) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=2, guided_choice=[" the city of Berlin"])
    out = smol_engines["sync"].generate([PROMPT], params)[0].outputs[0]
    assert out.finish_reason == "length" and " the city of Berlin".startswith(out.text)


def test_guided_choice_needs_a_tokenizer(llama_dir) -> None:
    with pytest.raises(ValueError, match=r"guided_choice \['x'\] needs a tokenizer"):
        make_llm(llama_dir).generate([[1, 2, 3]], SamplingParams(guided_choice=["x"]))


def test_choices_come_through_an_engine_process(smol_llm, default_model_dir) -> None:
    """The CUDA default: the front end checks the request, the engine process makes the
    choices' tokens (the params pickled without them) and masks with them."""
    import asyncio

    from vllm_runner import AsyncLLM

    params = SamplingParams(temperature=0.0, max_tokens=20, guided_choice=CHOICES[1:])
    (want,) = smol_llm.generate([PROMPT], params)
    apart = AsyncLLM(default_model_dir, engine_process=True, dtype="float32", device="cpu",
                     max_model_len=256, cpu_kv_cache_gb=0.05)  # fmt: skip
    try:
        (got,) = asyncio.run(apart.generate([PROMPT], params))
        holds_eos = SamplingParams(guided_choice=["yes<|im_end|>"])  # (checked in the caller)
        with pytest.raises(ValueError, match="holds the end token"):
            asyncio.run(apart.generate([PROMPT], holds_eos))
    finally:
        asyncio.run(apart.shutdown())
    assert got.outputs[0].token_ids == want.outputs[0].token_ids
    assert got.outputs[0].text in CHOICES[1:]
