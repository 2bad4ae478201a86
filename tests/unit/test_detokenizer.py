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


def test_a_tokenizer_that_cleans_up_spaces_streams_every_character(default_model_dir, monkeypatch):
    """A tokenizer whose decode cleans up spaces (" '" -> "'", " n't" -> "n't": Llama 3's
    config under transformers < 5.7, forced here) streams its decoder's text without the
    clean-up, as vLLM's incremental decoder does (found in review: the two decodes a token
    cleaned up across the tokens already streamed, and dropped the characters that moved:
    "He said ' hello ' to me." came out "He said 'ello 'o me.")."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        default_model_dir,
        clean_up_tokenization_spaces=True,
        clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output=True,
    )
    text = "He said ' hello ' to me. I do n't know"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) != text  # (its decode cleans up)
    prompt = tokenizer.encode("Say:", add_special_tokens=False)
    for decoder in (module.DecodeStream, None):
        with monkeypatch.context() as m:
            m.setattr(module, "DecodeStream", decoder)
            detok = IncrementalDetokenizer(tokenizer, prompt, [], False, True)
        assert "".join(_deltas(detok, ids)) == detok.text == text


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


def _byte_fallback_tokenizer():
    """Llama 2 style: SentencePiece BPE over '▁' and the letters, every other character as
    the byte pieces (<0xNN>) of its UTF-8 bytes, the text's first space stripped."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": b + 1 for b in range(256)}}
    vocab |= {p: 257 + i for i, p in enumerate(["▁", *"abcdefghijklmnopqrstuvwxyz"])}
    backend = Tokenizer(models.BPE(vocab, [], byte_fallback=True, unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])  # fmt: skip
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", clean_up_tokenization_spaces=False
    )


@pytest.mark.parametrize("byte_fallback", [False, True])
def test_two_decodes_a_token_give_a_character_the_prompt_began_as_the_decoder_does(
    default_model_dir, byte_fallback, monkeypatch
):
    """A prompt of ids may end inside a character: the two decodes a token (a tokenizer that
    cleans up spaces, or the incremental decoder refused) stream what the incremental
    decoder streams, the output ending the character or not (found in review: they cut the
    output's first text where the prompt's replacement text ended: ' 日本' came out '本',
    a character of byte pieces as U+FFFD)."""
    tokenizer = _byte_fallback_tokenizer() if byte_fallback else _tokenizer(default_model_dir)
    ids = tokenizer.encode("I like 日本 and ภาษา", add_special_tokens=False)
    cuts = [i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]).endswith("\ufffd")]
    assert cuts
    unended = tokenizer.encode(" and more", add_special_tokens=False)
    for cut in cuts:
        whole = max(k for k in range(cut) if not tokenizer.decode(ids[:k]).endswith("\ufffd"))
        for out in (ids[cut:], unended):
            fast = IncrementalDetokenizer(tokenizer, ids[:cut], [], False, True)
            with monkeypatch.context() as m:
                m.setattr(module, "DecodeStream", None)
                slow = IncrementalDetokenizer(tokenizer, ids[:cut], [], False, True)
            assert _deltas(slow, out) == _deltas(fast, out), (cut, out)
            if out is not unended:
                assert tokenizer.decode(ids[:whole]) + slow.text == tokenizer.decode(ids)


@pytest.mark.parametrize("prompt", ["a 🙂日", "日é日"])
def test_byte_pieces_after_prompt_tokens_that_start_inside_a_character(prompt, monkeypatch):
    """The prompt tokens decoded ahead of the output start at a character: a byte-fallback
    decoder reads a run of byte pieces that is not UTF-8 as U+FFFD throughout, and the
    output's byte pieces continue the prompt's run (found in review: '日本' after a prompt
    whose last 6 tokens began inside '🙂' came out as six U+FFFD)."""
    tokenizer = _byte_fallback_tokenizer()
    head = tokenizer.encode(prompt, add_special_tokens=False)
    ids = tokenizer.encode(prompt + "日本 ok", add_special_tokens=False)
    assert ids[: len(head)] == head and tokenizer.decode(head[-6:]).startswith("\ufffd")
    for decoder in (module.DecodeStream, None):
        with monkeypatch.context() as m:
            m.setattr(module, "DecodeStream", decoder)
            detok = IncrementalDetokenizer(tokenizer, head, [], False, True)
        assert "".join(_deltas(detok, ids[len(head) :])) == "日本 ok"


def _smol_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def test_the_stream_holds_back_the_longest_stop_string_less_one_character(default_model_dir):
    """Streamed text lags by ``len(longest stop) - 1`` characters, which may begin a stop
    string, and the rest comes with the last delta; nothing lags when the stop string stays in
    the output (include_stop_str_in_output), as vLLM."""
    tokenizer = _tokenizer(default_model_dir)
    prompt = _smol_ids(tokenizer, "The capital of France is")
    ids = _smol_ids(tokenizer, " Paris is nice")  # " Paris", " is", " nice"
    held = IncrementalDetokenizer(tokenizer, prompt, ["xyz", "ab"], False, True)
    assert _deltas(held, ids) == [" Par", "is ", "is ni", "ce"]
    kept = IncrementalDetokenizer(tokenizer, prompt, ["xyz", "ab"], True, True)
    assert _deltas(kept, ids) == [" Paris", " is", " nice", ""]
    short = IncrementalDetokenizer(tokenizer, prompt, ["xyz", "ab"], False, True)
    assert _deltas(short, _smol_ids(tokenizer, "I like")) == ["", "I li", "ke"]  # ("I" < 2)


def test_stop_strings_count_from_the_text_after_min_tokens(default_model_dir):
    """As vLLM: the text of the first min_tokens tokens is not searched for stop strings, not
    even by one that ends where it ends; one that ends past it is found, even if it began
    inside it."""
    tokenizer = _tokenizer(default_model_dir)
    prompt = _smol_ids(tokenizer, "The capital of France is")
    paris, dot = _smol_ids(tokenizer, " Paris.")
    detok = IncrementalDetokenizer(tokenizer, prompt, ["Paris"], False, True, min_tokens=1)
    assert (detok.add_tokens([paris]), detok.add_tokens([dot])) == (None, None)
    assert detok.text == " Paris."
    detok = IncrementalDetokenizer(tokenizer, prompt, ["Paris"], False, True, min_tokens=0)
    assert (detok.add_tokens([paris]), detok.text) == ("Paris", " ")
    detok = IncrementalDetokenizer(tokenizer, prompt, ["is."], False, True, min_tokens=1)
    assert (detok.add_tokens([paris]), detok.add_tokens([dot]), detok.text) == (None, "is.", " Par")


@pytest.mark.parametrize("stops", [["Par", "Pa"], ["Pa", "Par"]])
def test_stop_strings_at_one_place_the_first_listed_wins(default_model_dir, stops):
    tokenizer = _tokenizer(default_model_dir)
    prompt = _smol_ids(tokenizer, "The capital of France is")
    detok = IncrementalDetokenizer(tokenizer, prompt, stops, True, True)
    assert detok.add_tokens(_smol_ids(tokenizer, " Paris")) == stops[0]
    assert detok.text == " " + stops[0]


def test_a_stop_string_twice_in_one_tokens_text_cuts_at_the_first(default_model_dir):
    tokenizer = _tokenizer(default_model_dir)
    prompt = _smol_ids(tokenizer, "I like")
    detok = IncrementalDetokenizer(tokenizer, prompt, ["an"], False, True)
    assert (detok.add_tokens(_smol_ids(tokenizer, " banana")), detok.text) == ("an", " b")


def test_a_front_ends_text_builders_keep_the_requests_text_settings(default_model_dir):
    """The detokenizers a front end builds for a request the engine process leaves
    undetokenized: one a completion, a stop token's text kept only if asked, and a special
    token's only if not skipped."""
    from vllm_runner import SamplingParams
    from vllm_runner.engine.stream_route import text_builders

    tokenizer = _tokenizer(default_model_dir)
    prompt = _smol_ids(tokenizer, "The capital of France is")
    ids = [*_smol_ids(tokenizer, " Paris"), tokenizer.eos_token_id]  # (<|im_end|>)
    cases = [
        (True, False, " Paris"),
        (False, False, " Paris"),
        (True, True, " Paris"),
        (False, True, " Paris<|im_end|>"),
    ]  # (skip_special_tokens, include_stop, text)
    for skip, keep, want in cases:
        params = SamplingParams(n=2, skip_special_tokens=skip, include_stop_str_in_output=keep)
        builders = text_builders(tokenizer, prompt, params)
        assert len(builders) == 2
        for builder in builders:
            builder.add_tokens(ids, stop_terminated=True)
            assert builder.text == want, (skip, keep)


def test_two_decodes_a_token_decode_a_few_tokens_however_long_the_stream(
    default_model_dir, monkeypatch
):
    """Each token's two decodes cover the tokens since the last text and the one before them,
    not the whole output (which made a stream's decoding quadratic in its length)."""
    monkeypatch.setattr(module, "DecodeStream", None)
    tokenizer = _tokenizer(default_model_dir)
    prompt = _smol_ids(tokenizer, "The capital of France is")
    detok = IncrementalDetokenizer(tokenizer, prompt, [], False, True)
    sizes, decode = [], detok._decode
    detok._decode = lambda ids: sizes.append(len(ids)) or decode(ids)
    _deltas(detok, _smol_ids(tokenizer, " word" * 100))
    assert detok.text == " word" * 100 and max(sizes) <= len(prompt) + 1


def test_a_character_the_output_leaves_unended_after_one_the_prompt_began_is_kept(
    default_model_dir, monkeypatch
):
    """The replacement text of a character the prompt began is dropped from the output's
    first text alone: the output's own unended character (' 日' cut to its first token, then
    ' ok') keeps its replacement text."""
    tokenizer = _tokenizer(default_model_dir)
    ids = _smol_ids(tokenizer, "I like 日本")
    cut = next(i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]).endswith("\ufffd"))
    broken = _smol_ids(tokenizer, " 日")[:1]
    assert tokenizer.decode(broken) == tokenizer.decode(ids[cut - 1 : cut]) == " \ufffd"
    for decoder in (module.DecodeStream, None):
        with monkeypatch.context() as m:
            m.setattr(module, "DecodeStream", decoder)
            detok = IncrementalDetokenizer(tokenizer, ids[:cut], [], False, True)
        _deltas(detok, ids[cut:] + broken + _smol_ids(tokenizer, " ok"))
        assert detok.text == " 日本 \ufffd ok", decoder


def test_a_skipped_special_token_leaves_the_next_words_space(monkeypatch):
    """A byte-fallback decoder strips the first space of the text it decodes: a skipped
    special token (no text) must not move the window of the two decodes past the text before
    it, or the next word loses its space."""
    tokenizer = _byte_fallback_tokenizer()
    ids = tokenizer.encode("hello big world", add_special_tokens=False)  # ▁ h e l l o ▁ b ...
    unk = tokenizer.unk_token_id
    for decoder in (module.DecodeStream, None):
        with monkeypatch.context() as m:
            m.setattr(module, "DecodeStream", decoder)
            detok = IncrementalDetokenizer(tokenizer, ids[:6], [], False, True)
        _deltas(detok, [unk, *ids[6:10], unk, *ids[10:]])
        assert detok.text == " big world", decoder


@pytest.mark.parametrize("prompt", ["a 🙂日é", "🙂🙂é"])
def test_byte_pieces_after_a_prompt_whose_last_tokens_hold_a_4_byte_character(prompt, monkeypatch):
    """The prompt tokens decoded ahead of the output start at a character: 3 tokens back
    from the 4th byte of '🙂', and none back from its 1st (its bytes decode to it only all
    four together)."""
    tokenizer = _byte_fallback_tokenizer()
    head = tokenizer.encode(prompt, add_special_tokens=False)
    ids = tokenizer.encode(prompt + "日本 ok", add_special_tokens=False)
    assert ids[: len(head)] == head
    for decoder in (module.DecodeStream, None):
        with monkeypatch.context() as m:
            m.setattr(module, "DecodeStream", decoder)
            detok = IncrementalDetokenizer(tokenizer, head, [], False, True)
        assert "".join(_deltas(detok, ids[len(head) :])) == "日本 ok", decoder
