"""guided_choice: the choices' tokens, exactly which tokens a step allows (on the host and,
under async scheduling, by the pending token on the device), and the settings it refuses."""

import math

import pytest
import torch

from vllm_runner.engine.input_processor import EngineLimits, InputProcessor
from vllm_runner.sample.guided_choice import allowed_next, apply_guided_choice, choice_token_ids
from vllm_runner.sample.rows import SamplingRow
from vllm_runner.sample.sampler import Sampler
from vllm_runner.sampling_params import SamplingParams

VOCAB = 12
SEQS = [(1, 2, 3), (1, 2), (4,)]  # "1 2" is a choice and the start of "1 2 3"
ENDS = [9, 10]


class CharTokenizer:
    """One id per character (its code point); a zero-width space encodes to nothing."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        assert add_special_tokens is False
        return [ord(c) for c in text if c != "\u200b"]


def test_choices_become_their_tokens_once() -> None:
    assert choice_token_ids(CharTokenizer(), ["ab", "c", "ab"]) == [(97, 98), (99,)]


def test_a_choice_of_no_tokens_is_refused() -> None:
    with pytest.raises(ValueError, match=r"guided_choice entry '\\u200b' makes no tokens"):
        choice_token_ids(CharTokenizer(), ["a", "\u200b"])


@pytest.mark.parametrize(
    ("output", "allowed"),
    [
        ([], [(1, -1), (4, -1)]),
        ([1], [(2, -1)]),
        ([1, 2], [(3, -1), (9, -1), (10, -1)]),  # go on to "1 2 3", or end at "1 2"
        ([1, 2, 3], [(9, -1), (10, -1)]),
        ([4], [(9, -1), (10, -1)]),
        ([7], []),  # no choice starts so (a dropped step's row): nothing
    ],
)
def test_allowed_next_with_the_output_on_the_host(output, allowed) -> None:
    assert allowed_next(SEQS, output, False, ENDS) == allowed


@pytest.mark.parametrize(
    ("known", "allowed"),
    [
        ([], [(2, 1), (9, 4), (10, 4)]),  # pending 1: then 2; pending 4: then an end
        ([1], [(3, 2), (9, 2), (10, 2)]),
        ([1, 2], [(9, 3), (10, 3)]),  # "1 2" whole on the host: its pending token ends it
        ([1, 2, 3], []),
        ([4], []),
    ],
)
def test_allowed_next_with_a_token_pending(known, allowed) -> None:
    assert allowed_next(SEQS, known, True, ENDS) == allowed


def _row(output=(), num_pending=0, stop_token_ids=None, prompt=(7, 8), seqs=SEQS) -> SamplingRow:
    params = SamplingParams(temperature=0.0, stop_token_ids=stop_token_ids)
    params.guided_choice_token_ids = seqs
    params.all_stop_token_ids = {9}
    return SamplingRow(params, [*prompt, *output], len(prompt), None, num_pending)


def _plain_row() -> SamplingRow:
    return SamplingRow(SamplingParams(temperature=0.0), [7, 8], 2, None)


def _kept(logits: torch.Tensor) -> list[list[int]]:
    return [[t for t, v in enumerate(row) if not math.isinf(v)] for row in logits.tolist()]


def test_each_row_keeps_only_its_choices_next_tokens() -> None:
    rows = [_row(), _plain_row(), _row([1, 2], stop_token_ids=[10]), _row([1, 2, 3]), _row([7])]
    logits = torch.randn(len(rows), VOCAB)
    before = logits.clone()
    apply_guided_choice(logits, rows, None)
    # the end tokens: the model's EOS ids and the row's stop_token_ids
    assert _kept(logits) == [[1, 4], list(range(VOCAB)), [3, 9, 10], [9], list(range(VOCAB))]
    assert torch.equal(logits[logits.isfinite()], before[logits.isfinite()])  # kept: as were


def test_a_pending_token_picks_the_allowed_tokens_on_the_device() -> None:
    rows = [_row([], 1), _row([], 1), _row([1], 1), _row([1, 2], 1), _row([1, 2], 0)]
    pending = torch.tensor([1, 4, 2, 3, -1])
    logits = torch.randn(len(rows), VOCAB)
    apply_guided_choice(logits, rows, pending)
    # the last row's newest token is on the host: no pending one to compare
    assert _kept(logits) == [[2], [9], [3, 9], [9], [3, 9]]


def test_each_row_compares_its_own_pending_token_token_0_too() -> None:
    """``pending`` has every sampling row's token, plain rows' too: a guided row reads its
    own, and a choice's token 0 must be pending to count (-1 alone is "any")."""
    seqs = [(0, 5), (6, 7)]
    rows = [_plain_row(), _row([], 1, seqs=seqs), _row([], 1, seqs=seqs)]
    logits = torch.randn(len(rows), VOCAB)
    apply_guided_choice(logits, rows, torch.tensor([0, 6, 0]))
    assert _kept(logits) == [list(range(VOCAB)), [7], [5]]


def test_a_row_no_choice_continues_may_sample_anything() -> None:
    """A step launched after the row's end token (its token is dropped): a row of -inf would
    be NaN for the sampling kernels."""
    rows = [_row([1, 2, 3], 1), _row([], 1)]
    logits = torch.randn(2, VOCAB)
    apply_guided_choice(logits, rows, torch.tensor([9, 5]))  # 5 starts no choice
    assert _kept(logits) == [list(range(VOCAB))] * 2


@pytest.mark.parametrize("greedy", [True, False])
def test_the_sampler_draws_only_allowed_tokens(greedy: bool) -> None:
    sampler = Sampler(torch.device("cpu"), seed=0)
    params = SamplingParams(temperature=0.0 if greedy else 1.0)
    params.guided_choice_token_ids = SEQS
    params.all_stop_token_ids = {9}
    rows = [SamplingRow(params, [7, 1], 1, seed=s) for s in range(16)]  # output [1]
    logits = torch.randn(16, VOCAB)
    logits[:, 2] -= 50.0  # the one allowed token, far below the others
    assert sampler(logits, rows).token_ids == [2] * 16


@pytest.mark.parametrize(
    ("settings", "name"),
    [
        ({"min_tokens": 2}, "min_tokens"),
        ({"ignore_eos": True}, "ignore_eos"),
        ({"allowed_token_ids": [1]}, "allowed_token_ids"),
        ({"bad_words": ["x"]}, "bad_words"),
    ],
)
def test_settings_that_could_leave_no_token_are_refused(settings, name) -> None:
    with pytest.raises(ValueError, match=f"guided_choice cannot be combined with {name}"):
        SamplingParams(guided_choice=["a"], **settings)


def test_a_choice_holding_a_stop_string_is_refused() -> None:
    """The output would end inside it (at the stop string), with no choice whole."""
    with pytest.raises(ValueError) as error:
        SamplingParams(guided_choice=["a", "b, c"], stop=["x", ","])
    assert str(error.value) == (
        "guided_choice entry 'b, c' holds the stop string ',': the output would end inside it"
    )
    SamplingParams(guided_choice=["a", "b c"], stop=[","])  # none holds one: taken


def _inputs(vocab_size: int = 256, eos: frozenset[int] = frozenset({9})) -> InputProcessor:
    limits = EngineLimits("", 64, vocab_size, 16, 8, serving=False, eos_token_ids=eos)
    inputs = InputProcessor(limits, None)
    inputs.tokenizer = CharTokenizer()  # (after: the prompt-length bounds need a real one)
    return inputs


@pytest.mark.parametrize(
    ("choices", "stop_token_ids", "message"),
    [  # "\t" is token 9, the model's EOS; "," is 44
        (["a", "b\tc"], None, "guided_choice entry 'b\\tc' holds the end token 9"),
        (["a", "b,c"], [44], "guided_choice entry 'b,c' holds the end token 44"),
        (["a", ",b"], [44], "guided_choice entry ',b' holds the end token 44"),
    ],
)
def test_a_choice_holding_an_end_token_is_refused(choices, stop_token_ids, message) -> None:
    """Sampled, that token ends the output inside the choice (the scheduler stops on it)."""
    params = SamplingParams(guided_choice=choices, stop_token_ids=stop_token_ids)
    with pytest.raises(ValueError) as error:
        _inputs().validate([1, 2], params)
    assert str(error.value) == (
        f"{message} (an EOS or stop token id): the output would end inside it"
    )
    _inputs().validate([1, 2], SamplingParams(guided_choice=["a", "bc"], stop_token_ids=[44]))


def test_a_model_with_no_eos_needs_stop_token_ids() -> None:
    """After a whole choice only an end token may come: with none, every token could."""
    inputs = _inputs(eos=frozenset())
    with pytest.raises(ValueError) as error:
        inputs.validate([1, 2], SamplingParams(guided_choice=["a"]))
    assert str(error.value) == (
        "guided_choice ['a']: the output ends after a choice with an EOS token, and this model "
        "has none: give stop_token_ids"
    )
    inputs.validate([1, 2], SamplingParams(guided_choice=["a"], stop_token_ids=[44]))


def test_a_choice_token_outside_the_vocabulary_is_refused() -> None:
    """Its index in the step's mask would be another row's token (or past the last row)."""
    with pytest.raises(ValueError) as error:
        _inputs(vocab_size=100).validate([1, 2], SamplingParams(guided_choice=["a", "0d"]))
    assert str(error.value) == (
        "guided_choice entry '0d' token id 100 is outside the vocabulary [0, 100)"
    )


@pytest.mark.parametrize("choices", [[], [""], ["a", 1], "ab", {"a": 1}])
def test_bad_choice_lists_are_refused(choices) -> None:
    with pytest.raises(ValueError, match="guided_choice must be a"):
        SamplingParams(guided_choice=choices)


def test_guided_rows_read_the_output() -> None:
    """Under async scheduling the runner gives them the pending token."""
    params = SamplingParams(guided_choice=["a"])
    assert not params.reads_output  # (its tokens are made at admission)
    params.guided_choice_token_ids = [(97,)]
    assert params.reads_output
    assert SamplingRow(params, [1], 1, None).has_extras


def test_json_mode_needs_a_tokenizer_and_an_end_token() -> None:
    """As a choice, a whole JSON object ends with an end token: with none, no step could end
    it; and its masks are made from the tokenizer's pieces."""
    inputs = _inputs(eos=frozenset())
    with pytest.raises(ValueError) as error:
        inputs.validate([1, 2], SamplingParams(json_object=True))
    assert str(error.value) == (
        "json_object: the output ends after the object with an EOS token, and this model has "
        "none: give stop_token_ids"
    )
    inputs.validate([1, 2], SamplingParams(json_object=True, stop_token_ids=[44]))
    inputs.tokenizer = None
    with pytest.raises(ValueError, match="json_object needs a tokenizer"):
        inputs.validate([1, 2], SamplingParams(json_object=True, stop_token_ids=[44]))
