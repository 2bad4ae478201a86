"""Beam search's rounds on hand-made logprobs: which candidates finish, which go on, the
ranking with a length penalty, and the settings it refuses."""

import math
from types import SimpleNamespace

import pytest

from vllm_runner.beam_search import BeamSearch, BeamSearchParams, round_params, start
from vllm_runner.engine.errors import ContextLengthError

EOS = 9


def _search(width: int = 2, max_tokens: int = 4, **kwargs) -> BeamSearch:
    return BeamSearch([1, 2], BeamSearchParams(width, max_tokens, **kwargs), {EOS})


def test_a_round_keeps_the_best_beams_and_every_end_among_the_candidates() -> None:
    s = _search(width=2)
    assert s.pending() == [[1, 2]]
    # the top 2 x width = 4 are read (the fifth, 7, is not a candidate)
    s.advance([{5: -0.1, EOS: -0.5, 6: -1.0, 4: -2.0, 7: -3.0}])
    assert [b.tokens for b in s.beams] == [[1, 2, 5], [1, 2, 6]]
    assert [b.cum_logprob for b in s.beams] == [-0.1, -1.0]
    assert [(f.tokens, f.cum_logprob, f.finish_reason) for f in s.finished] == [
        ([1, 2, EOS], -0.5, "stop")
    ]
    s.advance([{EOS: -0.2, 3: -0.3, 4: -0.4, 8: -0.5}, {EOS: -0.1, 3: -5.0, 4: -6.0, 8: -7.0}])
    assert [b.tokens for b in s.beams] == [[1, 2, 5, 3], [1, 2, 5, 4]]
    assert [f.tokens for f in s.finished] == [[1, 2, EOS], [1, 2, 5, EOS], [1, 2, 6, EOS]]
    assert s.beams[0].logprobs == [
        {5: -0.1, EOS: -0.5, 6: -1.0, 4: -2.0, 7: -3.0},
        {EOS: -0.2, 3: -0.3, 4: -0.4, 8: -0.5},
    ]


def test_the_result_ranks_finished_and_live_by_score_with_the_length_penalty() -> None:
    """Scores: cum_logprob / len ** length_penalty, len with the prompt, without the end."""
    tops = [{EOS: -1.0, 3: -0.6, 4: -0.7, 5: -5.0}, {3: -0.6, 4: -0.7, 5: -0.8, 6: -0.9}]

    def run(penalty: float) -> list:
        s = _search(width=2, max_tokens=2, length_penalty=penalty)
        s.advance(tops[:1])
        s.advance([tops[1], tops[1]])
        assert s.done and s.pending() == []
        return [(r.tokens, r.finish_reason) for r in s.result()]

    # finished [1, 2, EOS]: -1.0 / 2 ** p; live [1, 2, 3, 3]: -1.2 / 4 ** p
    assert run(0.0) == [([1, 2, EOS], "stop"), ([1, 2, 3, 3], "length")]
    assert run(1.0) == [([1, 2, 3, 3], "length"), ([1, 2, 3, 4], "length")]  # -0.3 > -0.325 > -0.5


def test_with_ignore_eos_an_end_token_goes_on_as_a_beam() -> None:
    s = _search(width=2, ignore_eos=True)
    s.advance([{EOS: -0.1, 3: -0.2, 4: -0.3, 5: -0.4}])
    assert [b.tokens for b in s.beams] == [[1, 2, EOS], [1, 2, 3]] and not s.finished


def test_the_search_ends_when_no_beam_goes_on() -> None:
    s = _search(width=1)
    s.advance([{EOS: -0.1, 3: -math.inf}])  # (a -inf candidate is still ranked last)
    assert [b.tokens for b in s.beams] == [[1, 2, 3]]
    s.advance([{EOS: -0.1}])
    assert s.done and s.beams == [] and s.pending() == []
    assert [(r.tokens, r.cum_logprob) for r in s.result()] == [([1, 2, EOS], -0.1)]


def test_each_round_asks_for_one_token_and_twice_the_width_of_logprobs() -> None:
    p = round_params(BeamSearchParams(beam_width=3, max_tokens=5))
    assert (p.max_tokens, p.logprobs, p.temperature, p.ignore_eos) == (1, 6, 0.0, True)


def test_logprobs_for_another_number_of_beams_are_refused() -> None:
    s = _search()
    with pytest.raises(RuntimeError, match="2 logprobs for 1 beams"):
        s.advance([{3: -1.0}, {4: -1.0}])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beam_width": 0}, r"beam_width must be in \[1, 10\] .*got 0"),
        (
            {"beam_width": 11},
            r"beam_width must be in \[1, 10\] \(each round reads the top 2 x "
            r"beam_width <= 20 logprobs\), got 11",
        ),  # fmt: skip
        ({"beam_width": True}, "beam_width must be an integer, got True"),
        ({"beam_width": 2.0}, "beam_width must be an integer, got 2.0"),
        ({"max_tokens": 0}, "max_tokens must be >= 1, got 0"),
        ({"ignore_eos": 1}, "ignore_eos must be True or False, got 1"),
        ({"temperature": 0.7}, "temperature must be 0 for beam search .*got 0.7"),
        ({"length_penalty": math.nan}, "length_penalty must be a finite number, got nan"),
        ({"length_penalty": "1"}, "length_penalty must be a finite number, got '1'"),
    ],
)
def test_settings_are_checked(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BeamSearchParams(**{"beam_width": 2, "max_tokens": 4, **kwargs})


def test_with_ignore_eos_a_beam_ending_in_an_end_token_is_scored_without_it() -> None:
    """As vLLM's get_beam_search_score: a final end token is not counted in the length
    whether or not it finished the beam: [1, 2, EOS] scores -1.0 / 2, [1, 2, 3] -1.2 / 3."""
    s = _search(width=1, max_tokens=1, ignore_eos=True)
    s.advance([{EOS: -1.0, 3: -1.2}])
    assert [(r.tokens, r.finish_reason) for r in s.result()] == [([1, 2, 3], "length")]


def test_only_the_top_twice_the_width_are_candidates() -> None:
    """Width 1: the top 2 both end, so the search ends; the third (6) is not read."""
    s = BeamSearch([1, 2], BeamSearchParams(1, 4), {EOS, 8})
    s.advance([{EOS: -0.1, 8: -0.2, 6: -0.3}])
    assert s.done and s.beams == [] and [f.tokens for f in s.finished] == [[1, 2, EOS], [1, 2, 8]]


def test_equal_logprobs_are_ranked_by_token_id() -> None:
    s = _search(width=1)
    s.advance([{4: -0.5, 3: -0.5}])
    assert [b.tokens for b in s.beams] == [[1, 2, 3]]


def test_a_prompt_that_fills_the_context_with_max_tokens_is_searched() -> None:
    """prompt + max_tokens == max_model_len fits; one more token does not."""
    inputs = SimpleNamespace(
        tokenize=list, validate=lambda ids, params: None,
        limits=SimpleNamespace(max_model_len=32, eos_token_ids={EOS}),
    )  # fmt: skip
    [search] = start(inputs, [list(range(1, 25))], BeamSearchParams(2, max_tokens=8))
    assert search.pending() == [list(range(1, 25))]
    with pytest.raises(ContextLengthError, match="= 33 do not fit max_model_len 32"):
        start(inputs, [list(range(1, 26))], BeamSearchParams(2, max_tokens=8))


def test_a_finished_sequence_ranks_before_a_live_one_of_equal_score() -> None:
    """As vLLM's (finished, then live, sorted stably): -0.5 / 2 == -0.75 / 3."""
    s = _search(width=1, max_tokens=1)
    s.advance([{EOS: -0.5, 3: -0.75}])
    assert [r.tokens for r in s.result()] == [[1, 2, EOS]]
