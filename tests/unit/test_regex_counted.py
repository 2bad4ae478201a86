"""guided_regex's counted repeats (a repeat past COUNTED_REPEAT: one copy of its body and a
count beside the DFA state) against Python's ``re.fullmatch`` on random texts around their
bounds: {0,n}, {m,n}, {n}, {n,}, nested counts, counts inside alternations, two counts
running at once, a counted body of several UTF-8 lengths and escapes; those whose count is
not one number written out as copies; masks by horizon key against token-by-token walks; the
bounds that still refuse a hostile pattern, each named."""

import json
import random
import re

import numpy as np
import pytest

from vllm_runner.sample import regex_subsets
from vllm_runner.sample.json_schema import schema_to_regex
from vllm_runner.sample.regex_dfa import DEAD, START, RegexCursor, compile_regex
from vllm_runner.sample.regex_masks import RegexMasks, allowed_tokens
from vllm_runner.sample.regex_nfa import COUNTED_REPEAT
from vllm_runner.sample.token_masks import TokenBytes


def _fields(rng: random.Random, field, sizes: list[int]) -> str:
    return "".join(field(rng) for _ in range(rng.choice(sizes)))


def _run(rng: random.Random, chars: str, sizes: list[int]) -> str:
    return "".join(rng.choice(chars) for _ in range(rng.choice(sizes)))


N = COUNTED_REPEAT + 1  # (the smallest count that is counted)
# (pattern, counted: whether the DFA keeps a count, a random text near the pattern's bounds)
CASES = [
    (f"[a-z]{{0,{N + 70}}}", True, lambda r: _run(r, "abz", [0, 1, N + 69, N + 70, N + 71])),
    (f"[a-c]{{{N},{N + 20}}}x", True,
     lambda r: _run(r, "abc", [N - 1, N, N + 10, N + 20, N + 21]) + r.choice(["x", "", "y"])),
    (f"(?:ab|cd){{{N}}}", True,
     lambda r: _fields(r, lambda r: r.choice(["ab", "cd"]), [N - 1, N, N + 1])
     + r.choice(["", "", "a", "ac", "cd"])),
    (f"a{{{N},}}b", True, lambda r: "a" * r.choice([0, N - 1, N, N + 1, 3 * N]) + "b"),
    (f"(?:[a-c]{{0,{N}}},){{2,{N + 5}}}", True,  # nested counts
     lambda r: _fields(r, lambda r: _run(r, "ac", [0, 1, N, N + 1]) + r.choice([",", ",", ""]),
                       [1, 2, 3, N + 5, N + 6])),
    (f"(?:x[0-9]{{{N},{N + 5}}}|y[ab]{{0,{N}}}z)+", True,  # counts inside alternations
     lambda r: _fields(r, lambda r: r.choice(["x" + _run(r, "09", [N - 1, N, N + 5, N + 6]),
                                              "y" + _run(r, "ab", [0, N, N + 1]) + "z"]),
                       [1, 2, 3])),
    (f"[a-c]{{0,{N}}}|[b-d]{{0,{N + 30}}}", True,  # two counts at once
     lambda r: _run(r, r.choice(["bc", "abc", "bcd", "ad"]), [0, N - 1, N, N + 1, N + 30, N + 31])),
    (f"(?:é|😀|[a-c]){{{N - 9},{N}}}!", True,  # a body of 1, 2 and 4 bytes
     lambda r: _run(r, "é😀a", [N - 10, N - 9, N, N + 1]) + r.choice(["!", "", "!!"])),
    (f'"(?:[^"\\\\]|\\\\.){{0,{N}}}"', True,  # an escape is a character
     lambda r: '"' + _fields(r, lambda r: r.choice(["a", "é", '\\"', "\\\\", '"', "\\"]),
                             [0, N - 1, N, N + 1]) + '"'),
    (f"(?:(?:ab|cd){{{N}}}e){{0,{N}}}", True,  # a count inside a counted body
     lambda r: _fields(r, lambda r: "ab" * r.choice([N - 1, N, N + 1]) + r.choice(["e", "", "ee"]),
                       [0, 1, 2, 3])),
    (f"(?:[ab]{{{N}}}c){{2}}", True,  # copies of a counted repeat
     lambda r: _fields(r, lambda r: _run(r, "ab", [N - 1, N, N + 1]) + "c", [1, 2, 3])),
    (f"[a-z]{{0,{N}}}[a-z0-9]", True, lambda r: _run(r, "ab9", [0, 1, N, N + 1, N + 2])),
    (f"(?:ab|a){{0,{N}}}", False,  # an iteration's end is not one place: copies
     lambda r: _fields(r, lambda r: r.choice(["a", "ab", "b"]), [0, N - 1, N, N + 1])),
    (f"(?:[ab]?){{0,{N}}}c", False,  # a body that matches the empty text: copies
     lambda r: _run(r, "ab", [0, N, N + 1]) + "c"),
    (f"[a-c]{{0,{N}}}|[a-d]{{0,{N + 1}}}|[a-e]{{0,{N + 2}}}|[a-f]{{0,{N + 3}}}", False,
     lambda r: _run(r, r.choice(["ab", "ad", "af", "ag"]), [0, N, N + 1, N + 2, N + 3, N + 4])),
    # (one byte ends an iteration of four counts: past MAX_EVENTS, copies)
]  # fmt: skip


@pytest.mark.parametrize(("pattern", "counted", "text"), CASES, ids=[c[0] for c in CASES])
def test_counted_repeats_match_as_re_fullmatch(pattern: str, counted: bool, text) -> None:
    dfa = compile_regex(pattern)
    assert (dfa.counters is not None) == counted
    rng = random.Random(pattern)
    want = re.compile(pattern, re.ASCII)
    texts = [text(rng) for _ in range(300)]
    for t in list(texts[:100]):  # one-character edits, at the ends too
        for k in (0, len(t) // 2, len(t)):
            texts += [t[:k] + t[k + 1 :], t[:k] + rng.choice("abc,é") + t[k:]]
    matched = [t for t in texts if dfa.fullmatch(t) != bool(want.fullmatch(t))]
    assert not matched, matched[:3]
    hits = sum(bool(want.fullmatch(t)) for t in texts)
    assert 0 < hits < len(texts)


@pytest.mark.parametrize("n", [1000, 10_000])
def test_a_json_strings_max_length_is_a_count(n: int) -> None:
    """A schema's maxLength 1,000 or 10,000 (past the old 10,000 DFA states at ~600): the
    DFA of one character of a JSON string and a count; each escape and UTF-8 character one
    of them."""
    pattern = schema_to_regex({"type": "string", "maxLength": n})
    dfa = compile_regex(pattern)
    assert dfa.num_states == 20 and dfa.counters is not None
    for k in (0, 1, n - 1, n, n + 1):
        for char in ("a", "é", "😀", '\\"', "\\n", "\\u00e9", "\\ud7ff"):
            text = f'"{char * k}"'
            fits = k <= n
            assert dfa.fullmatch(text) == fits == bool(re.fullmatch(pattern, text)), (k, char)
            assert len(json.loads(text)) == k
    assert not dfa.fullmatch('"a"b"') and not dfa.fullmatch('"\\"') and not dfa.fullmatch('"\n"')


def test_a_count_entered_again_while_it_runs_is_written_out() -> None:
    """``(?:a{0,N})*c``: the star enters the repeat again before it ends (two counts at once,
    which ``re`` takes exponential time to refuse); its copies' DFA is a*c's."""
    dfa = compile_regex(f"(?:a{{0,{N}}})*c")
    assert dfa.counters is None
    for k in range(3 * N):
        for end in ("c", "", "cc", "b"):
            text = "a" * k + end
            assert dfa.fullmatch(text) == bool(re.fullmatch("a*c", text)), text


PIECES = [None, b"a", b"b", b"ab", b"aa", b"ba", b"aaa", b",", b"a,", b",a", b"\xc3", b"\xa9",
          b"\xc3\xa9", b"a\xc3", b"c", b"", b"aaaa"]  # fmt: skip


def _walked(dfa, state: int, counts: tuple[int, ...]) -> np.ndarray:
    return np.array([bool(p) and dfa.walk(p, state, counts)[0] != DEAD for p in PIECES])


def test_masks_by_horizon_key_are_every_token_that_stays_in_the_pattern() -> None:
    """Writing ``a`` up to a counted bound: each step's mask equals walking every token
    from the cursor's state and counts; the counts far from the bound share one mask, so
    ``(é|a){0,N},`` makes the same masks at any N: one far, one per count within the
    longest token (4 bytes) of the bound, and the one past it (no count: only "," goes on)."""
    made = []
    for n in (N, 5 * N):
        pattern = f"(?:é|a){{0,{n}}},"
        dfa = compile_regex(pattern)
        masks = RegexMasks(TokenBytes(PIECES))
        cursor = RegexCursor(dfa)
        for k in range(n + 1):
            mask = masks.get(cursor)
            assert (mask.host == _walked(dfa, cursor.state, cursor.counts)).all(), k
            assert cursor.feed(b"a") == (k < n), k
        assert cursor.broken and cursor.state == DEAD
        made.append(sorted(key[2:] for key in masks.masks))
    assert made[0] == made[1] == [(), (0, 1), (0, 2), (0, 3), (0, 4), (0, 5)]


def test_a_mask_from_any_count_is_a_walk_of_every_token() -> None:
    pattern = f"(?:[a,]{{0,{N}}}é){{2,{N}}}"
    dfa = compile_regex(pattern)
    vocab = TokenBytes(PIECES)
    rng = random.Random(0)
    for _ in range(40):
        text = "".join(rng.choice(["a", ",", "é", "é"]) for _ in range(rng.randrange(3 * N)))
        state, counts = dfa.walk(text.encode(), START, dfa.zeros(START))
        if state != DEAD:
            got = allowed_tokens(vocab, dfa, state, counts)
            assert (got == _walked(dfa, state, counts)).all(), (text, counts)


def test_the_cursor_keeps_counts_across_tokens() -> None:
    dfa = compile_regex(f"(?:é|a){{{N}}}!")
    cursor = RegexCursor(dfa)
    assert cursor.counts == (0,)
    assert cursor.feed(b"\xc3") and cursor.counts == (0,)  # half a character
    assert cursor.feed(b"\xa9a") and cursor.counts == (2,)
    assert cursor.feed(b"a" * (N - 2)) and not cursor.accepts
    assert cursor.feed(b"!") and cursor.accepts and cursor.counts == ()
    assert not cursor.feed(b"a") and cursor.broken


def test_past_its_work_bound_the_construction_writes_counts_out(monkeypatch) -> None:
    monkeypatch.setattr(regex_subsets, "MAX_BRANCHES", 1)
    dfa = compile_regex(f"[a-z]{{0,{N}}}")
    assert dfa.counters is None and dfa.num_states == N + 2
    assert dfa.fullmatch("a" * N) and not dfa.fullmatch("a" * (N + 1))


def test_a_count_does_not_grow_the_dfa() -> None:
    for n in (N, 2000, 10_000):
        assert compile_regex(f"[a-z]{{0,{n}}}").num_states == 3  # dead, counting, past the bound
        assert compile_regex(f"(?:ab|cd){{{n}}}").num_states == 5
    assert compile_regex("((((a{300}b){200}c){200}d){200})").num_states == 6  # four counts


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        # copies (an iteration's end is not one place): 9,000 of them
        ("(ab|a){9000}", "more than 50000 NFA states (the limit)"),
        # it must remember which of the last 1,000 characters were "a"
        (".*a.{1000}", "more than 10000 DFA states (the limit)"),
        ("(a|b)*a(a|b){14}", "more than 10000 DFA states (the limit)"),
        # few DFA states, each holding thousands of copies (took minutes before this bound)
        ("(?:a?){0,10000}", "more than 500000 NFA states held by its DFA states together "
                            "(the limit)"),
        ("a{10001}", "a repeat count above 10000 (the limit) at position 1"),
    ],
)  # fmt: skip
def test_hostile_patterns_are_still_refused_naming_the_limit(pattern: str, message: str) -> None:
    with pytest.raises(ValueError) as error:
        compile_regex(pattern)
    assert str(error.value).startswith(f"guided_regex {pattern!r}") and message in str(error.value)
