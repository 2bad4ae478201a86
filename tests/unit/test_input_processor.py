"""InputProcessor's checks on their own: no model, no tokenizer (token ids), exact values."""

import re

import pytest

from vllm_runner.engine.errors import ContextLengthError
from vllm_runner.engine.input_processor import EngineLimits, InputProcessor
from vllm_runner.sampling_params import SamplingParams


def _inputs(serving: bool = False, **limits) -> InputProcessor:
    fields = dict(max_model_len=64, vocab_size=100, block_size=16, num_blocks=8) | limits
    return InputProcessor(EngineLimits("", serving=serving, **fields), None)


def test_a_tokens_prompt_dict_takes_a_tuple_of_ids_as_a_bare_prompt_does():
    inputs = _inputs()
    assert inputs.tokenize({"prompt_token_ids": (1, 2, 3)}) == [1, 2, 3]
    assert inputs.tokenize((1, 2, 3)) == [1, 2, 3]


def test_a_text_too_long_is_refused_naming_all_its_characters():
    """Characters the tokenizer drops do not count against the bound, but the error names
    the text's own length (the one the caller can see), not the counted one."""
    from test_tokenizer import _byte_level

    tokenizer = _byte_level(0x04)  # one character a token; "\x04" makes none
    inputs = InputProcessor(EngineLimits("", 8, 256, 16, 8, serving=True), tokenizer)
    assert (inputs.max_prompt_chars, inputs.uncounted) == (8, "\x04")
    inputs.check_text_length("\x04" * 3 + "a" * 7, "prompt")  # 7 counted
    with pytest.raises(ContextLengthError) as error:
        inputs.check_text_length("\x04" + "a" * 9, "prompt")  # 9 counted
    assert str(error.value) == (
        "prompt has 10 characters, more than max_model_len (8) tokens can hold: at most 8"
    )


def test_request_ids_are_plain_strings():
    """A str subclass's id is made a plain str (it may not load in an engine process); a
    stream given no id gets a fresh one."""
    from vllm_runner.engine.input_processor import request_ids, stream_request_id

    class Id(str):
        pass

    assert [type(r) for r in request_ids(Id("a"))] == [str]
    assert [type(r) for r in request_ids([Id("a"), "b"])] == [str, str]
    assert type(stream_request_id(Id("a"))) is str
    fresh = {stream_request_id(None) for _ in range(2)}
    assert len(fresh) == 2 and all(len(r) == 32 for r in fresh)


def test_default_params_cut_the_models_max_tokens_to_fit_only_online():
    """Online, the model's max_new_tokens past what max_model_len leaves is cut to fit (and
    the prompt checked); offline it is kept as it is (the engine stops at max_model_len)."""
    defaults = {"max_tokens": 100, "top_k": 5}
    online = _inputs(serving=True, sampling_defaults=defaults)
    offline = _inputs(serving=False, sampling_defaults=defaults)
    got = online.default_params([1] * 60)
    assert (got.max_tokens, got.top_k) == (4, 5)
    got = offline.default_params([1] * 60)
    assert (got.max_tokens, got.top_k) == (100, 5)


def test_token_ids_must_be_in_0_to_vocab_size():
    """A negative id would index the embedding from its end: refused, as one past it is."""
    inputs = _inputs()
    inputs.validate([0, 99], SamplingParams(max_tokens=1))
    for bad in (-1, 100):
        says = f"prompt token id {bad} is outside the vocabulary [0, 100)"
        with pytest.raises(ValueError, match=re.escape(says)):
            inputs.validate([1, bad], SamplingParams(max_tokens=1))
