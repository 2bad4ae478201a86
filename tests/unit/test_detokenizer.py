"""IncrementalDetokenizer: the tokenizer's own incremental decoder (DecodeStream) streams what
two decodes a token give, delta by delta, and the Rust decode those call gives what
transformers' decode gives."""

import random

import pytest

from vllm_runner.engine import detokenizer as module
from vllm_runner.engine.detokenizer import IncrementalDetokenizer

TEXTS = ["Paris, the café: 日本語 🙂🙂 naïve—\n\tok", "  spaced  out ", "<|im_end|> end",
         "ภาษาไทย 👍🏽 Ελληνικά"]  # fmt: skip


def _deltas(detok, ids: list[int]) -> list[str]:
    out = []
    for i in ids:
        detok.add_tokens([i])
        out.append(detok.take_delta(False))
    return [*out, detok.take_delta(True)]


def _tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    assert tokenizer.clean_up_tokenization_spaces is False  # (so the Rust tokenizer is used)
    return tokenizer


def _cases(tokenizer, rng: random.Random) -> list[tuple[list[int], list[int]]]:
    """(prompt, output) pairs: prompts of text (which end between characters), outputs of
    text or of random ids (bytes of broken characters, special tokens)."""
    encode = lambda t: tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
    cases = []
    for _ in range(40):
        prompt = encode(rng.choice(TEXTS) + " " + rng.choice(TEXTS))
        cases.append((prompt, encode(rng.choice(TEXTS))))
        cases.append((prompt, [rng.randrange(len(tokenizer)) for _ in range(40)]))
    return cases


@pytest.mark.parametrize("skip_special", [True, False])
def test_the_incremental_decoder_streams_what_two_decodes_a_token_stream(
    default_model_dir, skip_special, monkeypatch
):
    tokenizer = _tokenizer(default_model_dir)
    for prompt, ids in _cases(tokenizer, random.Random(0)):
        fast = IncrementalDetokenizer(tokenizer, prompt, [], False, skip_special)
        with monkeypatch.context() as m:
            m.setattr(module, "DecodeStream", None)
            slow = IncrementalDetokenizer(tokenizer, prompt, [], False, skip_special)
        assert fast._stream is not None and slow._stream is None
        assert _deltas(fast, ids) == _deltas(slow, ids)
        assert fast.text == slow.text


@pytest.mark.parametrize("skip_special", [True, False])
def test_backend_decode_streams_what_transformers_decode_streams(
    default_model_dir, skip_special, monkeypatch
):
    monkeypatch.setattr(module, "DecodeStream", None)  # the two decodes a token
    tokenizer = _tokenizer(default_model_dir)
    rng = random.Random(0)
    for prompt, ids in _cases(tokenizer, rng):
        prompt = [rng.randrange(len(tokenizer)) for _ in range(8)]  # (any ids: both decode)
        fast = IncrementalDetokenizer(tokenizer, prompt, [], False, skip_special)
        slow = IncrementalDetokenizer(tokenizer, prompt, [], False, skip_special)
        assert fast._backend is not None
        slow._backend = None  # transformers' decode
        assert _deltas(fast, ids) == _deltas(slow, ids)
        assert fast.text == slow.text


def test_a_character_the_prompt_began_and_the_output_ends_is_the_outputs(default_model_dir):
    """Token ids may split a character between prompt and output: the text of the prompt's
    tokens that end inside it comes out with the output (as decoding prompt + output shows
    it), not dropped."""
    tokenizer = _tokenizer(default_model_dir)
    ids = tokenizer.encode("I like 日本", add_special_tokens=False)
    cut = next(i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]).endswith("\ufffd"))
    detok = IncrementalDetokenizer(tokenizer, ids[:cut], [], False, True)
    _deltas(detok, ids[cut:])
    whole = tokenizer.decode(ids)
    whole_chars = max(k for k in range(cut) if not tokenizer.decode(ids[:k]).endswith("\ufffd"))
    assert tokenizer.decode(ids[:whole_chars]) + detok.text == whole
    assert detok.text.endswith("日本")


def test_a_decoder_that_fails_midway_hands_over_to_two_decodes(default_model_dir, monkeypatch):
    """The incremental decoder refuses windows whose text does not extend the shorter one's
    ("invalid prefix"): the detokenizer then goes on with two decodes a token, from the text
    it has given, and the deltas are those it would have streamed without the decoder."""
    tokenizer = _tokenizer(default_model_dir)
    real = module.DecodeStream

    class Failing:
        def __init__(self, **kwargs) -> None:
            self.inner, self.calls, self.fail_at = real(**kwargs), 0, None

        def step(self, backend, token):
            self.calls += 1
            if self.calls == self.fail_at:
                raise Exception("Invalid prefix encountered")
            return self.inner.step(backend, token)

    for prompt, ids in _cases(tokenizer, random.Random(2)):
        with monkeypatch.context() as m:
            m.setattr(module, "DecodeStream", Failing)
            failing = IncrementalDetokenizer(tokenizer, prompt, [], False, True)
        failing._stream.fail_at = failing._stream.calls + 3  # the third output token
        with monkeypatch.context() as m:
            m.setattr(module, "DecodeStream", None)
            slow = IncrementalDetokenizer(tokenizer, prompt, [], False, True)
        assert _deltas(failing, ids) == _deltas(slow, ids)
        assert len(ids) < 3 or failing._stream is None


def test_a_tokenizer_that_cleans_up_spaces_keeps_transformers_decode(default_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    tokenizer.clean_up_tokenization_spaces = True
    detok = IncrementalDetokenizer(tokenizer, [1], [], False, True)
    assert detok._backend is None and detok._stream is None


def test_a_character_the_prompt_began_and_the_output_does_not_end_stays_the_prompts(
    default_model_dir, monkeypatch
):
    """Left unended by the output, the replacement text of a character the prompt began is
    the prompt's (found in review: it came out as the output's first text), as with two
    decodes a token."""
    tokenizer = _tokenizer(default_model_dir)
    ids = tokenizer.encode("I like 日本", add_special_tokens=False)
    cut = next(i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]).endswith("\ufffd"))
    out = tokenizer.encode(" and more", add_special_tokens=False)
    fast = IncrementalDetokenizer(tokenizer, ids[:cut], [], False, True)
    with monkeypatch.context() as m:
        m.setattr(module, "DecodeStream", None)
        slow = IncrementalDetokenizer(tokenizer, ids[:cut], [], False, True)
    assert _deltas(fast, out) == _deltas(slow, out)
    assert fast.text == " and more"
