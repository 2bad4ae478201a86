"""guided_grammar's parser, compiler and recognizer: the dialect's forms against ``re`` (as
regular grammars) and against hand-made checks (nested brackets, JSON), left recursion
rewritten or refused, and every error naming its line and column or its limit."""

import itertools
import json
import re

import pytest
from grammar_samples import SAMPLES

from vllm_runner.sample.grammar_compile import MAX_ELEMENTS, compile_grammar
from vllm_runner.sample.grammar_parse import MAX_GRAMMAR_BYTES, MAX_RULES
from vllm_runner.sample.grammar_states import MAX_STACKS, GrammarCursor, GrammarStates
from vllm_runner.sample.regex_dfa import DEAD, compile_regex


def _run(grammar: str, text: str | bytes) -> tuple[bool, bool]:
    """(whether a sentence can still follow, whether the text is one)."""
    compiled = compile_grammar(grammar)
    cursor = GrammarCursor(compiled)
    data = text.encode() if isinstance(text, str) else text
    live = cursor.feed(GrammarStates(compiled), data)
    return live, live and cursor.accepts


# (grammar, the same language as a Python regex, the alphabet its strings are made of)
REGULAR = [
    ('root ::= ("ab" | "c")* "d"?', r"(ab|c)*d?", "abcd"),
    ("root ::= [a-c]+ [^a-c]{2} # two of anything else\n", r"[a-c]+[^a-c]{2}", "abxé"),
    ('root ::= "a"{2,3} "b"{1,} "c"{2}', r"a{2,3}b{1,}c{2}", "abc"),
    ('root ::= x y\nx ::= "é" | [\\x41-\\x43]\ny ::= . "."?', r"(é|[A-C]).\.?", "éAB."),
    ('root ::= ("a" | "")* "b"', r"(a|)*b", "ab"),  # (a repeat of a part that may be empty)
    ('root ::= ("\\"" [\\n\\t] "\\\\" | "\'")+', r'("[\n\t]\\|\')+', "\"\n\t\\'x"),
]


@pytest.mark.parametrize(("grammar", "pattern", "alphabet"), REGULAR)
def test_a_regular_grammar_takes_what_its_regex_takes(grammar, pattern, alphabet) -> None:
    """Every text of up to 5 characters: a sentence exactly where ``re`` matches it whole, a
    live prefix exactly where the regex's DFA has a match following (UTF-8 bytes)."""
    dfa = compile_regex(pattern)
    for n in range(6):
        for chars in itertools.product(alphabet, repeat=n):
            text = "".join(chars)
            want = (dfa.run(text.encode()) != DEAD, re.fullmatch(pattern, text) is not None)
            assert _run(grammar, text) == want, text


def _brackets(text: str) -> tuple[bool, bool]:
    depth = 0
    for c in text:
        depth += 1 if c == "(" else -1
        if depth < 0:
            return False, False
    return True, depth == 0


@pytest.mark.parametrize(
    "grammar",
    [
        'root ::= ("(" root ")")*',
        'root ::= root "(" root ")" | ""',  # left-recursive: rewritten
        'root ::= x\nx ::= \n  x\n  | x y\n  | ""\ny ::= "(" x ")"',  # (x ::= x: dropped)
    ],
)
def test_nested_brackets_are_counted(grammar: str) -> None:
    for n in range(9):
        for chars in itertools.product("()", repeat=n):
            text = "".join(chars)
            assert _run(grammar, text) == _brackets(text), text


def test_the_samples_take_their_sentences_and_json_what_json_loads_takes() -> None:
    for grammar, sentence in SAMPLES.values():
        assert _run(grammar, sentence) == (True, True)
        assert _run(grammar, sentence[:-3]) == (True, False)
    json_grammar = SAMPLES["json"][0]
    for text in ['{"a": [1, -2.5e+3, true, null, "x\\u00e9"]}', "[]", '"\\/"', "0", "-0.1"]:
        json.loads(text)
        assert _run(json_grammar, text) == (True, True), text
    for text in ['{"a" 1}', "[1,]", "01", '"\\x"', "tru e", '"a\nb"', "1.", "{,}"]:
        with pytest.raises(ValueError):
            json.loads(text)
        assert not _run(json_grammar, text)[1], text
    assert _run(SAMPLES["arithmetic"][0], "1+2*") == (True, False)
    assert _run(SAMPLES["arithmetic"][0], "1+*2") == (False, False)
    assert _run(SAMPLES["sql"][0], "SELECT * FROM t LIMIT 0") == (False, False)


def test_a_state_past_the_parses_limit_is_not_entered() -> None:
    """After "x" the text could be any of 1,002 parses (which of the empty n's it is in):
    more than MAX_STACKS, so "x" is not taken; "y" is."""
    grammar = 'root ::= "x" n{1000} n "b" | "y"\nn ::= "a" | ""'
    assert MAX_STACKS < 1002
    assert _run(grammar, "x") == (False, False)
    assert _run(grammar, "y") == (True, True)


@pytest.mark.parametrize(
    ("grammar", "says"),
    [
        ("", "must be a non-empty string"),
        ("root = x", r"line 1, column 6: expected '::=' after the rule name 'root', got '= x'"),
        ('root ::= "a"\n  foo', "line 2, column 3: rule 'foo' is not defined"),  # (a body's)
        ('root ::= "a" | b\n', r"line 1, column 16: rule 'b' is not defined \(rules: root\)"),
        (
            'root ::= "ab',
            r"column 13: expected '\"' closing the string at line 1, column 10, got the end",
        ),
        ('root ::= "a\\q"', r"line 1, column 12: expected an escape \(one of"),
        ('root ::= "\\x4"', r"line 1, column 11: expected 2 hex digits after '\\x'"),
        ("root ::= []", r"line 1, column 10: expected a character in the class \(it is empty\)"),
        ("root ::= [z-a]", "line 1, column 11: expected a range whose end is not below its"),
        ("root ::= [ab", r"line 1, column 13: expected '\]' closing the class at line 1"),
        ('root ::= ("a"', r"line 1, column 14: expected '\)' closing the '\(' at line 1, col"),
        ('root ::= "a"{3,2}', r"line 1, column 13: expected a repeat whose maximum is at least"),
        ('root ::= "a"{x}', r"line 1, column 14: expected a repeat count \(digits\) after '\{'"),
        ('root ::= "a"{1001}', r"line 1, column 14: expected a repeat count of at most 1000"),
        ('root ::= "a" )', r"line 1, column 14: expected a rule name .*, got '\)'"),
        ('root ::= "a"* * "b"', r"line 1, column 15: expected one repeat per item \(group it"),
        (
            'root ::= "a"\nroot ::= "b"',
            "line 2, column 1: expected a new rule: 'root' is defined already, at line 1, column 1",
        ),  # fmt: skip
        ('start ::= "a"', r"no rule 'root' \(the start\), got rules \['start'\]"),
        ('root ::= "a" root', "rule 'root' derives no text that ends"),
        ('root ::= a\na ::= b "x" | "y"\nb ::= a', "rule 'a' is left-recursive .*through 'b'"),
        ('root ::= n root "x" | "y"\nn ::= "a"?', "rule 'root' is left-recursive"),
        ('root ::= (root "+" | "x") "y"', "rule 'root' is left-recursive"),  # (in a group)
        ('root ::= n{1000} n "b"\nn ::= "a" | ""', "its start is more than 1000 ways to parse"),
        ('root ::= "a" [\\uD800-\\uDFFF]', "rule 'root' has a character or class of surrogates"),
    ],
)
def test_bad_grammars_are_refused_by_line_and_column(grammar: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        compile_grammar(grammar)


def test_the_limits() -> None:
    with pytest.raises(ValueError, match=f"more than {MAX_GRAMMAR_BYTES} \\(the limit\\)"):
        compile_grammar('root ::= "' + "é" * (MAX_GRAMMAR_BYTES // 2) + '"')
    rules = "".join(f'r{i} ::= "a"\n' for i in range(MAX_RULES))
    with pytest.raises(ValueError, match=f"more than {MAX_RULES} rules"):
        compile_grammar(rules + 'root ::= "a"')
    many = "".join(f'r{i} ::= ("ab" | "c"){{1000}}\n' for i in range(MAX_ELEMENTS // 1000))
    with pytest.raises(ValueError, match=f"more than {MAX_ELEMENTS} symbols .* in rule 'r"):
        compile_grammar('root ::= "a"\n' + many)
    nested = "root ::= " + "(" * 101 + '"a"' + ")" * 101
    with pytest.raises(ValueError, match="groups nested at most 100 deep"):
        compile_grammar(nested)


def test_the_dialects_forms_compile_alike() -> None:
    """A body may span lines (both dialects) and rules come in any order; comments end at
    the line's end; a rule that can never end is dropped from its alternatives."""
    written = """
    # a comment
    root ::=
        greeting   # first
        | "bye" never
    greeting ::= "hi" [!?]{0,2}
    never ::= "x" never
    """
    for text in ["hi", "hi!?", "bye"]:
        assert _run(written, text)[1] == (text != "bye"), text
    assert _run(written, "b") == (False, False)  # ("bye" needs never: dropped)
