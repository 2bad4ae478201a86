"""bad_words: the words' token sequences, and exactly which logits a step bans (on the host
and, under async scheduling, by the pending token on the device)."""

import math

import pytest
import torch

from vllm_runner.sample.bad_words import bad_word_token_ids, ban_bad_words
from vllm_runner.sample.rows import SamplingRow
from vllm_runner.sample.sampler import Sampler
from vllm_runner.sampling_params import SamplingParams

VOCAB = 12


class WordTokenizer:
    """One id per space-separated word; a word after a space gets another id (as BPE's 'Ġ')."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        assert add_special_tokens is False
        pieces = [("" if i == 0 and not text.startswith(" ") else " ") + w
                  for i, w in enumerate(text.split())]  # fmt: skip
        return [self.ids.setdefault(p, len(self.ids)) for p in pieces]


class CharTokenizer:
    """One id per character (its code point); a zero-width space encodes to nothing, as a
    normalizer that drops it."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        assert add_special_tokens is False
        return [ord(c) for c in text if c != "\u200b"]


def _row(sequences, output=(), num_pending=0, prompt=(7, 8)) -> SamplingRow:
    params = SamplingParams(temperature=0.0)
    params.bad_words_token_ids = [tuple(s) for s in sequences]
    return SamplingRow(params, [*prompt, *output], len(prompt), None, num_pending)


def _banned(rows, pending=None) -> list[list[int]]:
    logits = torch.arange(len(rows) * VOCAB, dtype=torch.float32).view(len(rows), VOCAB)
    ban_bad_words(logits, rows, pending)
    return [torch.nonzero(r == -math.inf).flatten().tolist() for r in logits]


def test_token_ids_at_the_start_and_after_a_space() -> None:
    tok = WordTokenizer()
    got = bad_word_token_ids(tok, ["  hello world", "hello", " bye"])
    hello, world, s_hello, s_world = (tok.ids[w] for w in ("hello", " world", " hello", " world"))
    assert world == s_world  # (one id: the same piece)
    assert got == [(hello, world), (s_hello, world), (hello,), (s_hello,),
                   (tok.ids["bye"],), (tok.ids[" bye"],)]  # fmt: skip


def test_token_ids_keep_trailing_spaces_and_each_sequence_once() -> None:
    """Only leading spaces go (a trailing one is part of the word); a sequence two words
    make is listed once, where it first came; a word with no tokens adds none."""
    a, b, sp = ord("a"), ord("b"), ord(" ")
    got = bad_word_token_ids(CharTokenizer(), ["ab ", " ab ", "b", "ab ", "\u200b"])
    assert got == [(a, b, sp), (sp, a, b, sp), (b,), (sp, b)]
    assert bad_word_token_ids(CharTokenizer(), ["\u200b"]) == []


def test_sequences_past_the_models_vocabulary_are_dropped() -> None:
    """A tokenizer's token the model has no logit for is never sampled: a sequence holding
    one bans nothing (its flat index was another row's token, or past the last row)."""
    got = bad_word_token_ids(CharTokenizer(), ["ab", "a\x7f", "~"], vocab_size=127)
    assert got == [(97, 98), (32, 97, 98), (126,), (32, 126)]  # "\x7f" is 127


def test_one_token_words_always_and_longer_ones_after_their_start() -> None:
    rows = [
        _row([(3,), (4, 5)], output=()),  # 4 5: nothing generated yet
        _row([(4, 5)], output=(1, 4)),  # ends with 4: 5 banned
        _row([(4, 5)], output=(4, 1)),  # 4 not last: 5 allowed
        _row([(2, 4, 5), (9, 4, 6)], output=(2, 4)),  # only the matching three-token word
        _row([(8, 4)], output=(), prompt=(7, 8)),  # the prompt does not count
        _row([(6, 6)], output=(6,)),
    ]
    assert _banned(rows) == [[3], [5], [], [5], [], [6]]


def test_a_pending_token_decides_on_the_device() -> None:
    """The newest output token is on the device: the host checks the tokens before it."""
    rows = [
        _row([(4, 5)], output=(1,), num_pending=1),  # pending 4: ban 5
        _row([(4, 5)], output=(1,), num_pending=1),  # pending 3: allow
        _row([(2, 4, 5)], output=(2,), num_pending=1),  # 2 on the host, pending 4: ban 5
        _row([(2, 4, 5)], output=(9,), num_pending=1),  # the host part differs: allow
        _row([(3,), (4, 5)], output=(), num_pending=1),  # pending 0: only 3
        _row([(4, 5)], output=(4,), num_pending=0),  # nothing pending: the host decides
    ]
    pending = torch.tensor([4, 3, 4, 4, 0, -1])
    assert _banned(rows, pending) == [[5], [], [5], [], [3], [5]]


def test_a_token_two_words_end_with_is_banned_if_either_holds() -> None:
    rows = [_row([(4, 5), (3, 5)], output=(1,), num_pending=1)] * 2
    assert _banned(rows, torch.tensor([3, 6])) == [[5], []]
    both = _row([(4, 5), (5,)], output=(1,), num_pending=1)
    assert _banned([both], torch.tensor([9])) == [[5]]


def test_token_0_is_a_token_not_the_sentinel() -> None:
    """A word whose pending-checked token is id 0 bans only where 0 is pending."""
    rows = [_row([(0, 5)], output=(1,), num_pending=1)] * 2
    assert _banned(rows, torch.tensor([3, 0])) == [[], [5]]
    assert _banned([_row([(2, 0, 5)], output=(2,), num_pending=1)], torch.tensor([3])) == [[]]


def test_only_banned_logits_change_under_a_pending_token() -> None:
    """A listed token whose word does not hold keeps its logit exactly, also next to one
    (listed before or after it) whose word holds."""
    rows = [
        _row([(3, 5), (4, 5)], output=(1,), num_pending=1),  # pending 3: the first holds
        _row([(4, 5), (3, 5)], output=(1,), num_pending=1),  # pending 3: the second holds
        _row([(3, 5), (4, 6)], output=(1,), num_pending=1),  # pending 9: neither
    ]
    logits = torch.arange(3 * VOCAB, dtype=torch.float32).view(3, VOCAB)
    expected = logits.clone()
    expected[0, 5] = expected[1, 5] = -math.inf
    ban_bad_words(logits, rows, torch.tensor([3, 3, 9]))
    assert torch.equal(logits, expected)


def test_the_sampler_bans_with_the_pending_token() -> None:
    """Sampler.sample applies the bans (rows with bad words are rows with extras), with the
    pending tokens it is given."""
    logits = torch.zeros(3, VOCAB)
    logits[:, 5] = 2.0
    logits[:, 6] = 1.0
    rows = [
        _row([(5,)]),  # one-token word: 5 never
        _row([(4, 5)], output=(1,), num_pending=1),  # pending 4: 5 banned
        _row([(4, 5)], output=(1,), num_pending=1),  # pending 3: 5 allowed
    ]
    sampled, _ = Sampler(torch.device("cpu"), 0).sample(logits, rows, torch.tensor([-1, 4, 3]))
    assert sampled.tolist() == [6, 6, 5]


def test_a_banned_inf_logit_becomes_minus_inf_and_other_rows_stay() -> None:
    logits = torch.zeros(3, VOCAB)
    logits[0, 5] = math.inf
    before = logits.clone()
    ban_bad_words(logits, [_row([(5,)]), _row([]), _row([(4, 5)], output=(3,))], None)
    assert logits[0, 5] == -math.inf
    logits[0, 5] = before[0, 5]
    assert torch.equal(logits, before)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("Paris", "bad_words must be a list of strings, got 'Paris'"),
        (b"Paris", "bad_words must be a list of strings, got b'Paris'"),
        ({"Paris": 1}, "bad_words must be a list of strings, got {'Paris': 1}"),
        ([1], "bad_words entry must be a string with a non-space character, got 1"),
        (["ok", "  "], "bad_words entry must be a string with a non-space character, got '  '"),
    ],
)
def test_bad_words_settings_refused(value, message) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(bad_words=value)


def test_reads_output_only_for_words_of_two_or_more_tokens() -> None:
    params = SamplingParams(bad_words=("a", "b c"))
    assert params.bad_words == ["a", "b c"] and not params.reads_output
    params.bad_words_token_ids = [(1,)]
    assert not params.reads_output
    params.bad_words_token_ids = [(1,), (2, 3)]
    assert params.reads_output
    assert SamplingParams(presence_penalty=0.5).reads_output
