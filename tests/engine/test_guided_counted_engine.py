"""Counted repeats end to end on the default model (CPU), synchronous steps and async
scheduling: a JSON string's maxLength 1,000 and 10,000 (past the DFA's old state limit) and
guided_regex's ``[a-z#]{0,5000}``. A logit bias pushes the model to a token of 80 '#' as
long as the mask allows it, so greedy and sampled outputs run into the bound: each stops
within one such token of it, never past, then ends with an EOS."""

import json
import re

import pytest

from vllm_runner import SamplingParams
from vllm_runner.tokenizer import token_bytes

WIDE = b"#" * 80


@pytest.fixture(scope="module")
def wide(smol_llm) -> int:
    """The id of the token of 80 '#'."""
    width = smol_llm.engine.runner.model.lm_head.vocab_size
    return token_bytes(smol_llm.get_tokenizer(), width).index(WIDE)


def _run_into_the_bound(llm, wide: int, bound: int, **guide) -> list:
    """A greedy and two sampled outputs, all biased to the wide token."""
    push = {"logit_bias": {wide: 100.0}, "max_tokens": bound // len(WIDE) + 100, **guide}
    greedy = SamplingParams(temperature=0.0, **push)
    hot = SamplingParams(temperature=1.0, n=2, seed=0, **push)
    prompt = llm.apply_chat_template([{"role": "user", "content": "Write a long line."}])
    outs = [out for request in llm.generate([prompt, prompt], [greedy, hot]) for out in
            request.outputs]  # fmt: skip
    assert len(outs) == 3
    for out in outs:
        assert out.finish_reason == "stop" and out.token_ids[-1] in llm.engine.eos_ids, out
    return outs


@pytest.mark.parametrize("steps", ["sync", "async"])
@pytest.mark.parametrize("n", [1000, 10_000])
def test_a_json_strings_max_length_holds_at_its_bound(smol_engines, wide, steps, n) -> None:
    llm = smol_engines[steps]
    schema = {"type": "string", "maxLength": n}
    for out in _run_into_the_bound(llm, wide, n, guided_json=schema):
        value = json.loads(out.text)
        assert isinstance(value, str) and n - len(WIDE) < len(value) <= n, len(value)


def test_a_counted_regex_holds_at_its_bound(smol_llm, wide) -> None:
    pattern = "[a-z#]{0,5000}"
    for out in _run_into_the_bound(smol_llm, wide, 5000, guided_regex=pattern):
        assert re.fullmatch(pattern, out.text) and len(out.text) > 5000 - len(WIDE), out.text
