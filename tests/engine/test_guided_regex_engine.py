"""guided_regex end to end on the default model (CPU), with synchronous steps and with async
scheduling (which a regex request turns off while it runs): every output fully matches its
pattern (by ``re``) then an EOS; greedy takes, at each step, the best of the allowed tokens
by HF transformers' logits on the same weights, the allowed ones found token by token."""

import re

import pytest
import torch
from engine_testing import make_llm

from vllm_runner import LLM, SamplingParams
from vllm_runner.sample.regex_dfa import DEAD, START, RegexDfa, compile_regex
from vllm_runner.tokenizer import token_bytes

CASES = [
    ("Is the sky blue? Answer yes or no.", r"(yes|no)"),
    ("Make up a phone number.", r"[0-9]{3}-[0-9]{4}"),
    ("Describe a cat as JSON with a name and an age.",
     r'\{"name": "[A-Z][a-z]{1,10}", "age": [1-9][0-9]?\}'),
]  # fmt: skip


def _prompt(llm: LLM, ask: str) -> str:
    messages = [{"role": "user", "content": ask}]
    return llm.get_tokenizer().apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


@pytest.fixture(scope="module")
def pieces(smol_llm) -> list[bytes | None]:
    return token_bytes(smol_llm.get_tokenizer(), smol_llm.engine.runner.model.lm_head.vocab_size)


def _allowed_by_brute_force(dfa: RegexDfa, state: int, pieces: list[bytes | None]) -> list[int]:
    table = dfa.table.tolist()

    def live(piece: bytes) -> bool:
        s = state
        for b in piece:
            s = table[s][b]
            if s == DEAD:
                return False
        return True

    return [t for t, piece in enumerate(pieces) if piece and live(piece)]


def _greedy_by_hf(hf, ids: list[int], dfa: RegexDfa, pieces, ends: list[int]) -> list[int]:
    out, state = [], START
    while not out or out[-1] not in ends:
        allowed = _allowed_by_brute_force(dfa, state, pieces)
        if dfa.accepting[state] or not allowed:
            allowed += ends
        with torch.no_grad():
            logits = hf(torch.tensor([ids + out])).logits[0, -1]
        token = allowed[int(logits[allowed].argmax())]
        out.append(token)
        if token not in ends:
            state = dfa.run(pieces[token], state)
    return out


@pytest.mark.parametrize("steps", ["sync", "async"])
@pytest.mark.parametrize(("ask", "pattern"), CASES, ids=["yes-no", "phone", "json"])
def test_greedy_takes_the_best_allowed_token_each_step(
    smol_engines, hf_smol, pieces, steps, ask, pattern
) -> None:
    llm = smol_engines[steps]
    prompt = _prompt(llm, ask)
    params = SamplingParams(temperature=0.0, max_tokens=60, guided_regex=pattern)
    out = llm.generate([prompt], params)[0].outputs[0]
    ends = sorted(llm.engine.eos_ids)
    ids = llm.get_tokenizer().encode(prompt)
    assert list(out.token_ids) == _greedy_by_hf(hf_smol, ids, compile_regex(pattern), pieces, ends)
    assert re.fullmatch(pattern, out.text) and out.finish_reason == "stop", out


@pytest.mark.parametrize("steps", ["sync", "async"])
def test_sampled_outputs_fully_match_then_eos(smol_engines, steps) -> None:
    llm = smol_engines[steps]
    ask, pattern = CASES[2]
    params = SamplingParams(temperature=1.0, n=3, seed=0, max_tokens=60, guided_regex=pattern)
    outs = llm.generate([_prompt(llm, ask)], params)[0].outputs
    for out in outs:
        assert re.fullmatch(pattern, out.text), out
        assert out.finish_reason == "stop" and out.token_ids[-1] in llm.engine.eos_ids, out
    assert len({o.text for o in outs}) > 1
    assert llm.engine.num_host_bound == 0  # (steps overlap again once the request is done)


def test_a_match_cut_by_max_tokens_is_a_prefix_of_one(smol_engines) -> None:
    llm = smol_engines["sync"]
    ask, pattern = CASES[2]
    params = SamplingParams(temperature=1.0, seed=1, max_tokens=4, guided_regex=pattern)
    out = llm.generate([_prompt(llm, ask)], params)[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 4
    assert compile_regex(pattern).run(out.text.encode()) != DEAD and out.text.startswith('{"')


def test_a_stop_token_id_ends_a_match_too(smol_engines) -> None:
    """The end tokens are the model's EOS ids and the request's stop_token_ids: "!" (its
    bytes outside the pattern) once the digits match."""
    llm = smol_engines["sync"]
    [bang] = llm.get_tokenizer().encode("!", add_special_tokens=False)
    params = SamplingParams(temperature=0.0, max_tokens=20, guided_regex="[0-9]{2}",
                            stop_token_ids=[bang], logit_bias={bang: 100.0})  # fmt: skip
    out = llm.generate([_prompt(llm, CASES[1][0])], params)[0].outputs[0]
    assert re.fullmatch("[0-9]{2}", out.text) and out.stop_reason == bang, out


def test_guided_regex_needs_a_tokenizer(llama_dir) -> None:
    with pytest.raises(ValueError, match=r"guided_regex 'a\+' needs a tokenizer"):
        make_llm(llama_dir).generate([[1, 2, 3]], SamplingParams(guided_regex="a+"))


def test_a_regex_comes_through_an_engine_process(smol_llm, default_model_dir) -> None:
    """The CUDA default: the front end checks the request, the engine process compiles the
    pattern (the params pickled with its text alone) and masks with it."""
    import asyncio

    from vllm_runner import AsyncLLM

    ask, pattern = CASES[1]
    params = SamplingParams(temperature=0.0, max_tokens=20, guided_regex=pattern)
    (want,) = smol_llm.generate([_prompt(smol_llm, ask)], params)
    apart = AsyncLLM(default_model_dir, engine_process=True, dtype="float32", device="cpu",
                     max_model_len=256, cpu_kv_cache_gb=0.05)  # fmt: skip
    try:
        (got,) = asyncio.run(apart.generate([_prompt(smol_llm, ask)], params))
    finally:
        asyncio.run(apart.shutdown())
    assert got.outputs[0].token_ids == want.outputs[0].token_ids
    assert re.fullmatch(pattern, got.outputs[0].text)
