r"""guided_grammar's parser: a grammar in the EBNF / GBNF dialect of vLLM's default
structured-output backend (xgrammar) and llama.cpp, to each rule's body as a tree of
``regex_parse``'s nodes (sets of code points, sequences, alternatives, repeats) and rule
references (``grammar_compile.py`` flattens it for the recognizer).

Taken: rules ``name ::= body`` (names of ASCII letters, digits, ``_`` and ``-``; ``root`` is
the start), each defined once; a body runs to the next ``name ::=`` (so it may span lines,
as both dialects write them); string literals ``"..."`` with the escapes ``\\ \" \' \n \r
\t \xHH \uHHHH \UHHHHHHHH`` (and ``\[ \] \- \^ \/``, themselves); classes ``[a-z]`` and
``[^...]`` over code points, with the same escapes; ``.`` (any character); grouping
``(...)``; ``|``; ``* + ?``; bounded repeats ``{m} {m,} {m,n}``; comments from ``#`` to the
line's end. Anything else (xgrammar's lookahead assertions, a rule's parameters) is refused
with its line and column and what was expected there.
"""

from typing import NamedTuple

from vllm_runner.sample.regex_parse import (
    HEX_DIGITS,
    MAX_CODE_POINT,
    Chars,
    Concat,
    Repeat,
    TextParser,
    negate,
    normalize,
)

MAX_GRAMMAR_BYTES = 65_536  # the text, in UTF-8
MAX_RULES = 1_000  # rules defined
MAX_GRAMMAR_REPEAT = 1_000  # a bound {m,n}: each count past the first is one more rule
MAX_NESTING = 100  # groups in groups (parsing and compiling recurse per level)

_NAME = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
_ESCAPES = {"n": 0x0A, "r": 0x0D, "t": 0x09, "\\": 0x5C, '"': 0x22, "'": 0x27, "[": 0x5B,
            "]": 0x5D, "-": 0x2D, "^": 0x5E, "/": 0x2F}  # fmt: skip
ANY_CHAR = Chars(((0, MAX_CODE_POINT),))  # (surrogates have no UTF-8: never written)


class Ref(NamedTuple):
    """A reference to the rule ``name``, at ``at`` in the text (for errors)."""

    name: str
    at: int


class ParsedGrammar(NamedTuple):
    text: str
    rules: dict[str, object]  # name -> body (in definition order)
    places: dict[str, int]  # name -> where its definition starts in the text


def where(text: str, at: int) -> str:
    """``at`` (an offset in ``text``) as "line L, column C" (both from 1)."""
    line = text.count("\n", 0, at) + 1
    return f"line {line}, column {at - text.rfind(chr(10), 0, at)}"


def parse_grammar(text: str) -> ParsedGrammar:
    """The grammar's rules; ValueError naming the line, column and what was expected."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"guided_grammar must be a non-empty string (rules 'name ::= ...'), "
                         f"got {text!r}"[:200])  # fmt: skip
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_GRAMMAR_BYTES:
        raise ValueError(f"guided_grammar: {size} bytes, more than {MAX_GRAMMAR_BYTES} (the limit)")
    return _Parser(text).grammar()


class _Parser(TextParser):
    def error(self, expected: str, at: int | None = None) -> ValueError:
        at = self.i if at is None else at
        got = repr(self.p[at : at + 12]) if at < len(self.p) else "the end of the grammar"
        return ValueError(f"guided_grammar: {where(self.p, at)}: expected {expected}, got {got}")

    def space(self) -> None:
        """Past white space and comments (new lines too: a body runs to the next rule)."""
        while self.i < len(self.p):
            c = self.p[self.i]
            if c == "#":
                end = self.p.find("\n", self.i)
                self.i = len(self.p) if end < 0 else end
            elif c in " \t\r\n":
                self.i += 1
            else:
                return

    def name(self) -> str:
        start = self.i
        while self.peek() in _NAME:
            self.i += 1
        return self.p[start : self.i]

    def grammar(self) -> ParsedGrammar:
        rules: dict[str, object] = {}
        places: dict[str, int] = {}
        self.space()
        while self.i < len(self.p):
            start = self.i
            name = self.name()
            if not name:
                raise self.error("a rule name (letters, digits, '_' or '-')")
            self.space()
            if not self.p.startswith("::=", self.i):
                raise self.error(f"'::=' after the rule name {name!r}")
            if name in rules:
                raise self.error(f"a new rule: {name!r} is defined already, at "
                                 f"{where(self.p, places[name])}", start)  # fmt: skip
            if len(rules) >= MAX_RULES:
                raise ValueError(f"guided_grammar: more than {MAX_RULES} rules (the limit)")
            self.i += 3
            rules[name], places[name] = self.alternation(), start
            self.space()
        if "root" not in rules:
            raise ValueError(f"guided_grammar: no rule 'root' (the start), got rules "
                             f"{list(rules)[:10]}")  # fmt: skip
        return ParsedGrammar(self.p, rules, places)

    def sequence(self):
        parts: list = []
        while True:
            self.space()
            c = self.peek()
            if c in ("", "|", ")") or self.at_rule_start():
                break
            parts.append(self.repeats(self.atom()))
        return parts[0] if len(parts) == 1 else Concat(tuple(parts))

    def at_rule_start(self) -> bool:
        """Whether a new rule ``name ::=`` starts here (it ends the body before it)."""
        j = self.i
        while j < len(self.p) and self.p[j] in _NAME:
            j += 1
        if j == self.i:
            return False
        while j < len(self.p) and self.p[j] in " \t\r\n":
            j += 1
        return self.p.startswith("::=", j)

    def atom(self):
        start, c = self.i, self.peek()
        if c == '"':
            return self.string()
        if c == "[":
            return Chars(self.char_class())
        if c == ".":
            self.i += 1
            return ANY_CHAR
        if c == "(":
            self.depth += 1
            if self.depth > MAX_NESTING:
                raise self.error(f"groups nested at most {MAX_NESTING} deep (the limit)")
            self.i += 1
            node = self.alternation()
            if self.peek() != ")":
                raise self.error(f"')' closing the '(' at {where(self.p, start)}")
            self.i += 1
            self.depth -= 1
            return node
        name = self.name()
        if not name:
            raise self.error("a string, a class '[...]', '.', '(' or a rule name")
        return Ref(name, start)

    def repeats(self, node):
        """The item with its repeat, if one follows (one only: a second would nest without a
        bound; a group repeats again, as ``(x*)+``)."""
        self.space()
        c = self.peek()
        if c in ("*", "+", "?"):
            self.i += 1
            node = Repeat(node, *{"*": (0, None), "+": (1, None), "?": (0, 1)}[c])
        elif c == "{":
            node = Repeat(node, *self.bounds())
        else:
            return node
        self.space()
        if self.peek() in ("*", "+", "?", "{"):
            raise self.error("one repeat per item (group it to repeat again, as (x*)+)")
        return node

    def bounds(self) -> tuple[int, int | None]:
        start = self.i
        self.i += 1
        self.space()
        low = self.count()
        if low is None:
            raise self.error("a repeat count (digits) after '{'")
        high: int | None = low
        self.space()
        if self.peek() == ",":
            self.i += 1
            self.space()
            high = self.count()
            self.space()
        if self.peek() != "}":
            raise self.error("'}' closing the repeat")
        self.i += 1
        if high is not None and high < low:
            raise self.error(f"a repeat whose maximum is at least its minimum ({low})", start)
        return low, high

    def count(self) -> int | None:
        start = self.i
        while self.peek().isdigit() and self.peek().isascii():
            self.i += 1
        if self.i == start:
            return None
        if self.i - start > 6 or int(self.p[start : self.i]) > MAX_GRAMMAR_REPEAT:
            raise self.error(f"a repeat count of at most {MAX_GRAMMAR_REPEAT} (the limit)", start)
        return int(self.p[start : self.i])

    def string(self):
        start = self.i
        self.i += 1
        chars = []
        while True:
            c = self.peek()
            if c in ("", "\n"):
                raise self.error(f"'\"' closing the string at {where(self.p, start)}")
            self.i += 1
            if c == '"':
                break
            code = self.escape() if c == "\\" else ord(c)
            chars.append(Chars(((code, code),)))
        return chars[0] if len(chars) == 1 else Concat(tuple(chars))

    def char_class(self):
        start = self.i
        self.i += 1
        negated = self.peek() == "^"
        self.i += negated
        ranges: list[tuple[int, int]] = []
        while self.peek() != "]":
            if self.peek() in ("", "\n"):
                raise self.error(f"']' closing the class at {where(self.p, start)}")
            at = self.i
            lo = self.class_char()
            hi = lo
            if self.peek() == "-" and self.peek(1) not in ("]", ""):
                self.i += 1
                hi = self.class_char()
                if hi < lo:
                    raise self.error("a range whose end is not below its start", at)
            ranges.append((lo, hi))
        self.i += 1
        if not ranges:
            raise self.error("a character in the class (it is empty)", start)
        merged = normalize(ranges)
        return negate(merged) if negated else merged

    def class_char(self) -> int:
        c = self.peek()
        self.i += 1
        return self.escape() if c == "\\" else ord(c)

    def escape(self) -> int:
        """The code point an escape writes (past its backslash)."""
        start, c = self.i - 1, self.peek()
        self.i += 1
        if c in _ESCAPES:
            return _ESCAPES[c]
        if c in HEX_DIGITS:
            digits = self.hex_digits(c)
            if digits is None:
                raise self.error(f"{HEX_DIGITS[c]} hex digits after '\\{c}'", start)
            if int(digits, 16) > MAX_CODE_POINT:
                raise self.error("a code point of at most U+10FFFF", start)
            return int(digits, 16)
        raise self.error("an escape (one of \\n \\r \\t \\\\ \\\" \\' \\[ \\] \\- \\^ \\/ "
                         "\\xHH \\uHHHH \\UHHHHHHHH)", start)  # fmt: skip
