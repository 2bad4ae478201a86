"""guided_regex's DFA against Python's ``re.fullmatch`` (with ``re.ASCII``, the documented
meaning of \\d \\w \\s): hand cases, random strings (non-ASCII ones too), texts walked out of
the DFA and their one-character edits; UTF-8 byte sequences against every boundary code
point; the constructs refused by name and position; the state limits; the cache."""

import random
import re

import numpy as np
import pytest

from vllm_runner.sample import regex_dfa
from vllm_runner.sample.regex_dfa import DEAD, START, RegexCursor, compile_regex
from vllm_runner.sample.regex_nfa import utf8_sequences

PATTERNS = [
    r'\{"name": "[^"\\]{0,20}", "age": (0|[1-9][0-9]{0,3})\}',
    r"(yes|no|maybe)",
    r"[a-z]+@[a-z]+\.(com|org)",
    r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?",
    r"^[0-9]{3}-[0-9]{4}$",
    r"\d+\.\d{2}|\w{2,}\s\S",
    r"[^a-c\u00e9]*",
    r"(\w|é|😀)+",
    r".{1,3}",
    r"(a|b)*a(a|b){3}",
    r"[\D][\W][\S]",
    r"x{2,}y{,2}z{0}",
    r"a{,}b{}{1",  # "{}" and "{1" are literals, "{,}" is "*"
    r"[]a-][^]x]\]\[",
    r"\x41\u00e9\U0001F600\n\t\.\*\+\?\|\(\)\{\}\^\$\-\/\"",
    r"[\x00-\x1f\\\"\n]|é+|€|(?:ab|)c",
    r"[\u0080-\u07ff][\u0800-\uffff][\U00010000-\U0010ffff]",
    r"[^\x00-\x7f]{2}",
    r"((a|)|b?)*c",
    r"",
    r"()|a",
]
ALPHABET = list('abcxyz019-.@ {}"\\:,_eE+\n\t') + ["é", "€", "😀", "ж", "\x00", "\x7f", "߿", "ࠀ"]


def _walk(dfa: regex_dfa.RegexDfa, rng: random.Random) -> str | None:
    """A random text the DFA accepts (bytes chosen among those that stay live)."""
    state, data = START, b""
    for _ in range(60):
        if dfa.accepting[state] and rng.random() < 0.3:
            return data.decode()
        live = np.flatnonzero(dfa.table[state] != DEAD)
        if not len(live):
            break
        b = int(rng.choice(live.tolist()))
        data, state = data + bytes([b]), int(dfa.table[state, b])
    return data.decode() if dfa.accepting[state] else None


def _edits(text: str, rng: random.Random) -> list[str]:
    out = []
    for _ in range(6):
        k = rng.randrange(len(text) + 1)
        c = rng.choice(ALPHABET)
        out += [text[:k] + c + text[k:], text[:k] + c + text[k + 1 :], text[:k] + text[k + 1 :]]
    return out


@pytest.mark.parametrize("pattern", PATTERNS)
def test_the_dfa_matches_as_re_fullmatch(pattern: str) -> None:
    dfa = compile_regex(pattern)
    want = re.compile(pattern, re.ASCII)
    rng = random.Random(pattern)
    texts = ["".join(rng.choices(ALPHABET, k=rng.randrange(8))) for _ in range(400)]
    walked = [t for t in (_walk(dfa, rng) for _ in range(200)) if t is not None]
    assert len(walked) > 100 or pattern in ("", "()|a", "x{2,}y{,2}z{0}")
    for text in walked:
        texts += [text, *_edits(text, rng)]
    for text in texts:
        assert dfa.fullmatch(text) == bool(want.fullmatch(text)), (pattern, text)
    assert any(want.fullmatch(t) for t in texts)


@pytest.mark.parametrize(
    ("pattern", "yes", "no"),
    [
        (PATTERNS[0], ['{"name": "Zoë 😀", "age": 42}', '{"name": "", "age": 0}'],
         ['{"name": "a"b", "age": 1}', '{"name": "\\u", "age": 1}', '{"name": "x", "age": 01}',
          '{"name": "x", "age": 12345}', '{"name": "' + "x" * 21 + '", "age": 1}']),
        (r"\d\w\s", ["1_\t", "9Z\x0b"], ["١a ", "1é ", "1a\u00a0"]),  # (ASCII meaning)
        (r".", ["é", "😀", "\r"], ["\n", ""]),
        (r"[^\n]", ["\x00", "\U0010ffff", "\ud7ff", "\ue000"], ["\n"]),
        (r"a|b$", ["a", "b"], ["b\n", "ab"]),
    ],
)  # fmt: skip
def test_hand_cases(pattern: str, yes: list[str], no: list[str]) -> None:
    dfa = compile_regex(pattern)
    for text in yes:
        assert dfa.fullmatch(text) and re.fullmatch(pattern, text, re.ASCII), text
    for text in no:
        assert not dfa.fullmatch(text) and not re.fullmatch(pattern, text, re.ASCII), text


BOUNDS = [0, 0x7F, 0x80, 0x7FF, 0x800, 0xFFF, 0x1000, 0xD7FF, 0xE000, 0xFFFF, 0x10000,
          0x3FFFF, 0x40000, 0xFFFFF, 0x100000, 0x10FFFF]  # fmt: skip


@pytest.mark.parametrize("seed", range(8))
def test_utf8_sequences_hold_exactly_the_ranges_encodings(seed: int) -> None:
    rng = random.Random(seed)
    lo = rng.choice([rng.randrange(0x110000), *BOUNDS])
    hi = rng.choice([c for c in [rng.randrange(lo, 0x110000), *BOUNDS] if c >= lo])
    seqs = utf8_sequences(((lo, hi),))
    probes = {lo, hi, lo - 1, hi + 1, *BOUNDS, *(rng.randrange(0x110000) for _ in range(3000))}
    for c in sorted(p for p in probes if 0 <= p <= 0x10FFFF and not 0xD800 <= p <= 0xDFFF):
        data = chr(c).encode()
        held = sum(
            len(s) == len(data) and all(a <= b <= z for (a, z), b in zip(s, data, strict=True))
            for s in seqs
        )
        assert held == (lo <= c <= hi), (hex(lo), hex(hi), hex(c), held)  # (once at most)


def test_surrogates_are_no_text() -> None:
    """A surrogate code point has no UTF-8: a class of surrogates alone matches nothing."""
    assert utf8_sequences(((0xD800, 0xDFFF),)) == ()
    with pytest.raises(ValueError, match=r"guided_regex '\[\\\\ud800-\\\\udfff\]' matches no text"):
        compile_regex(r"[\ud800-\udfff]")


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("a*?", "a lazy quantifier '*?' is not supported at position 1"),
        ("ab{1,2}?", "a lazy quantifier '{1,2}?' is not supported at position 2"),
        ("a++", "a possessive quantifier '++' is not supported at position 1"),
        (r"(a)\1", "a backreference or octal escape '\\1' is not supported at position 3"),
        ("a(?=b)", "a lookahead is not supported at position 1"),
        ("a(?!b)", "a negative lookahead is not supported at position 1"),
        ("(?<=a)b", "a lookbehind is not supported at position 0"),
        ("(?<!a)b", "a lookbehind is not supported at position 0"),
        ("(?P<x>a)", "a named group is not supported at position 0"),
        ("(?P=x)", "a named reference is not supported at position 0"),
        ("(?i)a", "inline flags or an unknown group '(?i' is not supported at position 0"),
        ("(?>a)", "an atomic group is not supported at position 0"),
        ("a(?#c)", "a comment group is not supported at position 1"),
        (r"\bx", "a word boundary '\\b' is not supported at position 0"),
        (r"x\Z", "an anchor '\\Z' is not supported at position 1"),
        (r"\q", "the escape '\\q' is not supported at position 0"),
        ("a^b", "'^' other than at the pattern's start is not supported at position 1"),
        ("(a$)", "'$' other than at the pattern's end is not supported at position 2"),
        ("*a", "nothing to repeat at position 0"),
        ("a|{2}", "nothing to repeat at position 2"),
        ("a**", "a repeated quantifier (multiple repeat) at position 2"),
        ("a{3,2}", "a repeat {3,2} whose maximum is below its minimum at position 1"),
        ("a{10001}", "a repeat count above 10000 (the limit) at position 1"),
        ("(ab", "a '(' never closed at position 0"),
        ("ab)", "an unbalanced ')' at position 2"),
        ("[ab", "a '[' never closed at position 0"),
        ("[z-a]", "a reversed range 'z-a' at position 1"),
        (r"[\d-z]", "a range with a class (\\d, \\w, \\s) at an end at position 1"),
        ("ab\\", "a trailing backslash at position 2"),
        (r"\x4", "an escape \\x without 2 hex digits at position 0"),
        (r"\U00110000", "an escape past U+10FFFF (\\U00110000) at position 0"),
        ("(" * 101 + ")" * 101, "groups nested more than 100 deep (the limit) at position 100"),
    ],
)
def test_constructs_outside_the_subset_are_refused_by_name_and_place(pattern, message) -> None:
    with pytest.raises(ValueError) as error:
        compile_regex(pattern)
    assert str(error.value).startswith("guided_regex ") and str(error.value).endswith(message)


def test_the_state_limits_name_themselves() -> None:
    with pytest.raises(ValueError, match="more than 10000 DFA states \\(the limit\\)"):
        compile_regex("(a|b)*a(a|b){14}")  # 2**15 states
    with pytest.raises(ValueError, match="more than 50000 NFA states \\(the limit\\)"):
        compile_regex("(ab|a){9000}")  # (copies: an iteration of it ends in two places)
    assert compile_regex("(a|b)*a(a|b){11}").num_states == 2**12 + 1  # (the dead state too)


def test_a_long_pattern_is_quoted_cut() -> None:
    with pytest.raises(ValueError) as error:
        compile_regex("a" * 200 + "*?")
    assert str(error.value) == (
        f"guided_regex {'a' * 80!r}...: a lazy quantifier '*?' is not supported at position 200"
    )


def test_dead_ends_are_merged_into_the_dead_state() -> None:
    """A branch that can never match (an empty class on its way) is no live state: a token
    entering it would be allowed and then trap the output."""
    dfa = compile_regex(r"a[^\x00-\U0010ffff]|ab")
    assert dfa.num_states == 4  # dead, start, after "a", after "ab"
    assert dfa.run(b"a") != DEAD and dfa.run(b"ac") == DEAD and dfa.fullmatch("ab")


def test_the_cursor_follows_bytes_across_tokens() -> None:
    cursor = RegexCursor(compile_regex("é+!"))
    assert cursor.feed(b"\xc3") and not cursor.accepts  # half a character
    assert cursor.feed(b"\xa9\xc3\xa9!") and cursor.accepts
    assert not cursor.feed(b"!") and cursor.broken and cursor.state == DEAD


def test_compiled_patterns_are_cached_bounded(monkeypatch) -> None:
    monkeypatch.setattr(regex_dfa, "_cache", type(regex_dfa._cache)())
    monkeypatch.setattr(regex_dfa, "_cache_bytes", 0)
    first = regex_dfa.compiled("[a-z]{3}")
    assert regex_dfa.compiled("[a-z]{3}") is first
    monkeypatch.setattr(regex_dfa, "DFA_CACHE_BYTES", first.table.nbytes * 2)
    regex_dfa.compiled("x")
    regex_dfa.compiled("[a-z]{3}")  # used again: "x" is now the least recent
    regex_dfa.compiled("yy")
    assert list(regex_dfa._cache) == ["[a-z]{3}", "yy"]
