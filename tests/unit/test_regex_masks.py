"""guided_regex's masks: each DFA state's mask against running every token through the DFA
one by one, the cache by (pattern, state), the end tokens' rules, the replay after a
preemption, the sampler keeping to the pattern greedy and hot, and the settings refused."""

import re

import numpy as np
import pytest
import torch

from vllm_runner.sample.regex_dfa import DEAD, START, compile_regex
from vllm_runner.sample.regex_masks import RegexMasks, allowed_tokens, apply_guided_regex
from vllm_runner.sample.rows import SamplingRow
from vllm_runner.sample.token_masks import TokenBytes
from vllm_runner.sampling_params import SamplingParams

# A hand-made vocabulary: whole words and their pieces, a character split across tokens
# ("é" is C3 A9), tokens across the patterns' parts, and enough single bytes that every
# pattern's text can be written; None: special tokens (0 is EOS).
PIECES = [None, b"yes", b"no", b"y", b"es", b"s", b"n", b"o", b"ye", b"a", b"b", b"ab", b"z",
          b"@", b".", b".com", b".or", b"g", b"com", b"@x.", b'{"', b"name", b'": "', b'"',
          b'", "age": ', b"age", b'": ', b"0", b"1", b"12", b"9}", b"}", b"\\", b"\xc3", b"\xa9",
          b"\xc3\xa9", b"\xc3\xa9\xc3\xa9ab", b" ", b"\n", None, b"x" * 7, b'"}', b"", b":",
          b"r", b"c", b"m", b"e", b","]  # fmt: skip
EOS = 0
PATTERNS = [
    r"(yes|no)",
    r"[a-z]+@[a-z]+\.(com|org)",
    r'\{"name": "[^"\\]{0,5}", "age": (0|[1-9][0-9]{0,2})\}',
    r"é+(ab)?",
]


def _brute_force(pattern: str, state: int) -> np.ndarray:
    dfa = compile_regex(pattern)
    return np.array([bool(p) and dfa.run(p, state) != DEAD for p in PIECES])


@pytest.mark.parametrize("pattern", PATTERNS)
def test_every_states_mask_is_every_token_that_stays_in_the_pattern(pattern: str) -> None:
    dfa = compile_regex(pattern)
    vocab = TokenBytes(PIECES)
    for state in range(1, dfa.num_states):
        got = allowed_tokens(vocab, dfa, state)
        assert (got == _brute_force(pattern, state)).all(), (state, np.flatnonzero(got))
    if pattern == PATTERNS[0]:  # (the empty token and the special ones: never)
        got = np.flatnonzero(allowed_tokens(vocab, dfa, START)).tolist()
        assert got == _ids([b"yes", b"no", b"y", b"n", b"ye"])


def test_masks_are_cached_by_pattern_and_state_bounded() -> None:
    """Two patterns' state 1 are two masks; past the bound the least recent goes first."""
    masks = RegexMasks(TokenBytes(PIECES), cache_bytes=0)  # (at least 16)
    rows = [_row([], pattern) for pattern in PATTERNS[:2]]
    for row in rows:
        masks.get(masks.advance(row, {EOS}))
    assert list(masks.masks) == [(PATTERNS[0], START), (PATTERNS[1], START)]
    first = masks.masks[(PATTERNS[0], START)]
    assert masks.get(masks.advance(rows[0], {EOS})) is first  # (moved to the end)
    pattern = PATTERNS[2]
    for state in range(2, 18):
        cursor = masks.advance(_row([], pattern), {EOS})
        cursor.state = state
        masks.get(cursor)
    assert len(masks.masks) == 16 and (PATTERNS[1], START) not in masks.masks
    assert (PATTERNS[0], START) not in masks.masks  # (16 newer ones came after it)


def _row(output: list[int], pattern: str, **kwargs) -> SamplingRow:
    params = SamplingParams(**{"temperature": 0.0, "guided_regex": pattern, **kwargs})
    params.all_stop_token_ids = {EOS}
    return SamplingRow(params, [7, 7, *output], 2, None)


def _ids(pieces: list[bytes]) -> list[int]:
    return [PIECES.index(p) for p in pieces]


def _allowed(logits: torch.Tensor) -> list[set[int]]:
    return [set(torch.isfinite(r).nonzero()[:, 0].tolist()) for r in logits]


def test_end_tokens_exactly_where_the_text_matches() -> None:
    """Row 0 is inside "no" (no end token); row 1 matches "é" and may go on ("é", "a",
    "ab") or end (EOS, or its stop token id 37, a " " that the pattern never takes); row 2
    matches "éab", which nothing continues (only end tokens); row 3 ended by EOS (not
    masked); row 4 is plain; row 5's stop token id "a" is an end token, not text, though
    its bytes would go on: where the text does not match, it is not allowed."""
    masks = RegexMasks(TokenBytes(PIECES))
    rows = [
        _row(_ids([b"n"]), PATTERNS[0]),
        _row(_ids([b"\xc3", b"\xa9"]), PATTERNS[3], stop_token_ids=[37]),
        _row(_ids([b"\xc3\xa9", b"ab"]), PATTERNS[3]),
        _row([*_ids([b"yes"]), EOS], PATTERNS[0]),
        SamplingRow(SamplingParams(temperature=0.0), [7], 1, None),
        _row(_ids([b"\xc3\xa9"]), r"é(a|é)", stop_token_ids=[9]),
    ]
    logits = torch.zeros(len(rows), len(PIECES))
    apply_guided_regex(logits, rows, masks)
    allowed = _allowed(logits)
    assert allowed[0] == set(_ids([b"o"]))
    assert allowed[1] == {
        EOS,
        37,
        *_ids([b"\xc3", b"\xc3\xa9", b"\xc3\xa9\xc3\xa9ab", b"a", b"ab"]),
    }
    assert allowed[2] == {EOS}
    assert allowed[3] == allowed[4] == set(range(len(PIECES)))
    assert allowed[5] == set(_ids([b"\xc3", b"\xc3\xa9"]))
    assert rows[3].regex_cursor.ended and not rows[3].regex_cursor.broken
    assert rows[1].regex_cursor.consumed == 2 and rows[1].regex_cursor.accepts


def test_a_state_no_token_continues_ends_the_output() -> None:
    """ "ye" needs an "s" this vocabulary cannot write alone: the end tokens are allowed (the
    output ends short of a match) rather than a row of -inf."""
    pieces = [None, b"ye", b"yes", b"es"]
    row = _row([1], PATTERNS[0])
    logits = torch.zeros(1, len(pieces))
    apply_guided_regex(logits, [row], RegexMasks(TokenBytes(pieces)))
    assert _allowed(logits) == [{EOS}]
    assert not row.regex_cursor.accepts


def test_an_end_token_before_a_match_breaks_the_cursor() -> None:
    """(Sampled only where nothing else could be: the request then ends.)"""
    masks = RegexMasks(TokenBytes(PIECES))
    row = _row([*_ids([b"n"]), EOS], PATTERNS[0])
    assert masks.advance(row, {EOS}).broken


def test_a_preempted_row_replays_its_output() -> None:
    masks = RegexMasks(TokenBytes(PIECES))
    tokens = _ids([b'{"', b"name", b'": "', b"\xc3", b"\xa9", b"ab", b'", "age": ', b"12"])
    row = _row(tokens[:4], PATTERNS[2])
    masks.advance(row, {EOS})
    row.token_ids += tokens[4:]
    again = _row(tokens, PATTERNS[2])  # a new runner row after a preemption: no cursor yet
    assert masks.advance(row, {EOS}) == masks.advance(again, {EOS})
    dfa = compile_regex(PATTERNS[2])
    assert again.regex_cursor.state == dfa.run(b'{"name": "\xc3\xa9ab", "age": 12')
    assert again.regex_cursor.consumed == 8 and not again.regex_cursor.accepts


def test_a_row_with_a_token_on_the_device_is_refused() -> None:
    row = _row([1], PATTERNS[0])
    row.num_pending = 1
    with pytest.raises(RuntimeError, match="guided_regex: 1 tokens still on the device"):
        apply_guided_regex(torch.zeros(1, len(PIECES)), [row], RegexMasks(TokenBytes(PIECES)))


@pytest.mark.parametrize("pattern", PATTERNS[1:])
@pytest.mark.parametrize("temperature", [0.0, 2.0])
def test_sampling_keeps_to_the_pattern(pattern: str, temperature: float) -> None:
    """Through the sampler: random logits, at most 60 draws, every prefix live, and a text
    that ends (EOS) fully matches, by ``re``."""
    from vllm_runner.sample.sampler import Sampler

    sampler = Sampler(torch.device("cpu"), 0)
    sampler.regex_masks = RegexMasks(TokenBytes(PIECES))
    dfa = compile_regex(pattern)
    gen = torch.Generator().manual_seed(0)
    ended = 0
    for seed in range(10):
        row = _row([], pattern, temperature=temperature, seed=seed)
        text, token = b"", None
        for _ in range(60):
            logits = torch.randn(1, len(PIECES), generator=gen)
            token = sampler.sample(logits, [row])[0].item()
            if token == EOS:
                break
            text += PIECES[token]
            row.token_ids.append(token)
            assert dfa.run(text) != DEAD, text
        if token == EOS:
            ended += 1
            assert re.fullmatch(pattern, text.decode()), text
    assert ended >= 5


@pytest.mark.parametrize(
    ("other", "value"),
    [
        ("min_tokens", 2),
        ("ignore_eos", True),
        ("allowed_token_ids", [1]),
        ("bad_words", ["x"]),
        ("guided_choice", ["a"]),
        ("json_object", True),
    ],
)
def test_settings_that_could_leave_no_token_are_refused(other: str, value: object) -> None:
    with pytest.raises(ValueError) as error:
        SamplingParams(guided_regex="a+", **{other: value})
    assert str(error.value) == (
        f"{other} cannot be combined with guided_regex, got {value!r}: the output must be able "
        "to end once it matches, with any of its tokens"
    )


@pytest.mark.parametrize("value", ["", 3, b"a+", ["a"]])
def test_guided_regex_is_a_non_empty_string(value: object) -> None:
    with pytest.raises(ValueError) as error:
        SamplingParams(guided_regex=value)
    assert str(error.value) == (
        f"guided_regex must be a non-empty string (a regular expression), got {value!r}"
    )


def test_a_pattern_outside_the_subset_is_refused_at_construction() -> None:
    with pytest.raises(ValueError) as error:
        SamplingParams(guided_regex="(?<=a)b")
    assert str(error.value) == "guided_regex '(?<=a)b': a lookbehind is not supported at position 0"
    row = SamplingRow(SamplingParams(guided_regex="a"), [1], 1, None)
    assert row.has_extras and not row.params.reads_output  # (its steps are synchronous)


def test_guided_regex_needs_a_tokenizer_and_an_end_token() -> None:
    from vllm_runner.engine.input_processor import EngineLimits, InputProcessor
    from vllm_runner.tokenizer import NO_TOKENIZER

    limits = EngineLimits("", 64, 256, 16, 8, serving=False, eos_token_ids=frozenset())
    inputs = InputProcessor(limits, None)
    with pytest.raises(ValueError) as error:
        inputs.validate([1, 2], SamplingParams(guided_regex="a+", stop_token_ids=[44]))
    assert str(error.value) == f"guided_regex 'a+' needs a tokenizer and {NO_TOKENIZER}"
    inputs.tokenizer = object()  # (only its presence is checked)
    with pytest.raises(ValueError) as error:
        inputs.validate([1, 2], SamplingParams(guided_regex="a+"))
    assert str(error.value) == (
        "guided_regex 'a+': the output ends after a match with an EOS token, and this model "
        "has none: give stop_token_ids"
    )
    inputs.validate([1, 2], SamplingParams(guided_regex="a+", stop_token_ids=[44]))


@pytest.mark.parametrize(
    ("data", "want"),
    [
        ({"structured_outputs": {"regex": "a+", "choice": None}}, {"guided_regex": "a+"}),
        ({"structured_outputs": {"choice": ["a"]}}, {"guided_choice": ["a"]}),
    ],
)
def test_structured_outputs_regex_becomes_guided_regex(data: dict, want: dict) -> None:
    from vllm_runner.serving.structured_outputs import structured_choice

    assert structured_choice(data) == want


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs: only one"),
        ({"structured_outputs": {"regex": "a+"}, "json_object": True},
         "structured_outputs: a regex cannot be combined with JSON mode"),
        ({"structured_outputs": {"regex": "a+"}, "guided_regex": "b"},
         "guided_regex: give it or structured_outputs.regex, not both"),
    ],
)  # fmt: skip
def test_structured_outputs_regex_conflicts(data: dict, message: str) -> None:
    from vllm_runner.serving.structured_outputs import structured_choice

    with pytest.raises(ValueError) as error:
        structured_choice(data)
    assert str(error.value).startswith(message)
