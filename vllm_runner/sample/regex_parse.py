r"""guided_regex's parser: a pattern in a subset of Python ``re``'s syntax to a tree whose
leaves are sets of code points (``regex_dfa.py`` compiles it to a DFA over UTF-8 bytes).

Taken: literal characters (any Unicode), escaped punctuation (``\.``, ``\\``, ``\{``, ...),
``\a \f \n \r \t \v``, ``\xXX \uXXXX \UXXXXXXXX``, the classes ``\d \D \w \W \s \S`` in
their ASCII meaning (``re.ASCII``'s: ``\d`` = [0-9], ``\w`` = [A-Za-z0-9_], ``\s`` =
[ \t\n\r\f\v]; their negations hold every non-ASCII character), ``.`` (any character but
``\n``), ``[...]`` and ``[^...]`` (ranges and escapes inside; ``\b`` is a backspace there),
groups ``(...)`` and ``(?:...)``, ``|``, the greedy quantifiers ``* + ? {n} {n,} {,m} {n,m}``,
and a leading ``^`` and trailing ``$``, ignored: the match is always the whole output. A ``{``
that starts no quantifier is a literal, as in ``re``. Anything else (lazy or possessive
quantifiers, backreferences, lookaround, named groups, inline flags, other anchors) is
refused by name and position: read some other way, it would hold the output to another
language than the client's ``re`` does.
"""

from typing import NamedTuple

MAX_CODE_POINT = 0x10FFFF
# NOTE: a count costs nothing where the repeat is counted (regex_nfa.py), but one written out
# as copies passes regex_nfa's MAX_NFA_STATES long before this; it covers guided_json's
# maxLength / maxItems, which json_schema_parts refuses past it by their name.
MAX_REPEAT = 10_000
MAX_GROUP_DEPTH = 100  # (parsing and compiling recurse per level)

Ranges = tuple[tuple[int, int], ...]  # code point ranges, sorted, disjoint, inclusive


class Chars(NamedTuple):
    """One character from a set."""

    ranges: Ranges


class Concat(NamedTuple):
    parts: tuple


class Either(NamedTuple):
    options: tuple


class Repeat(NamedTuple):
    node: object
    low: int
    high: int | None  # None: unbounded


DIGIT: Ranges = ((0x30, 0x39),)
WORD: Ranges = ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A))
SPACE: Ranges = ((0x09, 0x0D), (0x20, 0x20))
_CLASS_ESCAPES = {"d": DIGIT, "w": WORD, "s": SPACE}
_CHAR_ESCAPES = {"a": 0x07, "f": 0x0C, "n": 0x0A, "r": 0x0D, "t": 0x09, "v": 0x0B}
HEX_DIGITS = {"x": 2, "u": 4, "U": 8}  # an escape's letter -> the hex digits after it
_HEX = frozenset("0123456789abcdefABCDEF")
_ANCHORS = {"b": "a word boundary", "B": "a non-boundary", "A": "an anchor", "Z": "an anchor"}
_GROUP_EXTENSIONS = {"=": "a lookahead", "!": "a negative lookahead", "#": "a comment group",
                     ">": "an atomic group", "(": "a conditional group"}  # fmt: skip


def normalize(ranges) -> Ranges:
    """Sorted, merged (adjacent ranges too)."""
    merged: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return tuple((lo, hi) for lo, hi in merged)


def negate(ranges: Ranges) -> Ranges:
    """Every code point not in ``ranges`` (normalized)."""
    out, at = [], 0
    for lo, hi in ranges:
        if lo > at:
            out.append((at, lo - 1))
        at = hi + 1
    if at <= MAX_CODE_POINT:
        out.append((at, MAX_CODE_POINT))
    return tuple(out)


def shown(pattern: str, limit: int = 80) -> str:
    """The pattern as error messages quote it (a long one cut: the message names the place)."""
    return repr(pattern) if len(pattern) <= limit else repr(pattern[:limit]) + "..."


def parse(pattern: str):
    """The pattern's tree (``Chars`` / ``Concat`` / ``Either`` / ``Repeat``); ValueError naming
    what is not taken and where."""
    return _Parser(pattern).parse()


class TextParser:
    """What this parser and guided_grammar's (``grammar_parse.py``) share: the text, the
    position in it, the group depth, ``|`` over the subclass's ``sequence`` and hex escapes."""

    def __init__(self, text: str) -> None:
        self.p = text
        self.i = 0
        self.depth = 0

    def peek(self, k: int = 0) -> str:
        return self.p[self.i + k] if self.i + k < len(self.p) else ""

    def sequence(self):
        raise NotImplementedError

    def alternation(self):
        options = [self.sequence()]
        while self.peek() == "|":
            self.i += 1
            options.append(self.sequence())
        return options[0] if len(options) == 1 else Either(tuple(options))

    def hex_digits(self, letter: str) -> str | None:
        """The hex digits after the escape letter ``letter`` (x, u, U: HEX_DIGITS), read; None
        (nothing read) if fewer follow."""
        digits = self.p[self.i : self.i + HEX_DIGITS[letter]]
        if len(digits) < HEX_DIGITS[letter] or any(d not in _HEX for d in digits):
            return None
        self.i += len(digits)
        return digits


class _Parser(TextParser):
    def error(self, what: str, at: int | None = None) -> ValueError:
        at = self.i if at is None else at
        return ValueError(f"guided_regex {shown(self.p)}: {what} at position {at}")

    def unsupported(self, what: str, at: int) -> ValueError:
        return self.error(f"{what} is not supported", at)

    def parse(self):
        if self.peek() == "^":  # (ignored: the match is whole)
            self.i += 1
        node = self.alternation()
        if self.i < len(self.p):  # (only a ")" stops an alternation early)
            raise self.error("an unbalanced ')'")
        return node

    def sequence(self):
        parts: list = []
        while self.i < len(self.p) and self.peek() not in "|)":
            start = self.i
            if self.peek() == "$" and self.i == len(self.p) - 1 and self.depth == 0:
                self.i += 1  # (ignored: the match is whole)
                continue
            if self.quantifier() is not None:
                raise self.error("nothing to repeat", start)
            parts.append(self.quantified(self.atom()))
        return parts[0] if len(parts) == 1 else Concat(tuple(parts))

    def quantified(self, node):
        start = self.i
        bounds = self.quantifier()
        if bounds is None:
            return node
        after = self.peek()
        if after == "?":
            raise self.unsupported(f"a lazy quantifier {self.p[start : self.i + 1]!r}", start)
        if after == "+":
            raise self.unsupported(f"a possessive quantifier {self.p[start : self.i + 1]!r}", start)
        at = self.i
        if self.quantifier() is not None:
            raise self.error("a repeated quantifier (multiple repeat)", at)
        return Repeat(node, *bounds)

    def quantifier(self) -> tuple[int, int | None] | None:
        """The (low, high) of a quantifier here, consumed; None (nothing consumed) if none."""
        c = self.peek()
        if c in ("*", "+", "?"):
            self.i += 1
            return {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        if c != "{":
            return None
        start, j = self.i, self.i + 1
        low = high = ""
        while j < len(self.p) and self.p[j].isdigit() and self.p[j].isascii():
            low, j = low + self.p[j], j + 1
        comma = j < len(self.p) and self.p[j] == ","
        if comma:
            j += 1
            while j < len(self.p) and self.p[j].isdigit() and self.p[j].isascii():
                high, j = high + self.p[j], j + 1
        if j >= len(self.p) or self.p[j] != "}" or (not low and not comma):
            return None  # a literal "{", as in re
        self.i = j + 1
        for digits in (low, high):
            if len(digits) > len(str(MAX_REPEAT)) or (digits and int(digits) > MAX_REPEAT):
                raise self.error(f"a repeat count above {MAX_REPEAT} (the limit)", start)
        lo = int(low) if low else 0
        hi = (int(high) if high else None) if comma else lo
        if hi is not None and hi < lo:
            raise self.error(f"a repeat {{{lo},{hi}}} whose maximum is below its minimum", start)
        return lo, hi

    def atom(self):
        start, c = self.i, self.peek()
        if c == "(":
            return self.group()
        if c == "[":
            return Chars(self.char_class())
        self.i += 1
        if c == ".":
            return Chars(negate(((0x0A, 0x0A),)))
        if c == "\\":
            ranges = self.escape(in_class=False)
            return Chars(ranges)
        if c == "^":
            raise self.unsupported("'^' other than at the pattern's start", start)
        if c == "$":
            raise self.unsupported("'$' other than at the pattern's end", start)
        return Chars(((ord(c), ord(c)),))  # (a "{" of no quantifier, "}" and "]" too, as re)

    def group(self):
        start = self.i
        self.i += 1
        if self.peek() == "?":
            kind = self.peek(1)
            if kind == ":":
                self.i += 2
            elif kind == "P" or (kind == "<" and self.peek(2) not in "=!"):
                named = kind == "<" or self.peek(2) == "<"
                raise self.unsupported("a named group" if named else "a named reference", start)
            elif kind == "<":
                raise self.unsupported("a lookbehind", start)
            elif kind in _GROUP_EXTENSIONS:
                raise self.unsupported(_GROUP_EXTENSIONS[kind], start)
            else:
                raise self.unsupported(f"inline flags or an unknown group '(?{kind}'", start)
        self.depth += 1
        if self.depth > MAX_GROUP_DEPTH:
            raise self.error(f"groups nested more than {MAX_GROUP_DEPTH} deep (the limit)", start)
        node = self.alternation()
        if self.peek() != ")":
            raise self.error("a '(' never closed", start)
        self.i += 1
        self.depth -= 1
        return node

    def char_class(self) -> Ranges:
        start = self.i
        self.i += 1
        negated = self.peek() == "^"
        self.i += negated
        ranges: list[tuple[int, int]] = []
        first = True
        while True:
            if self.i >= len(self.p):
                raise self.error("a '[' never closed", start)
            c = self.peek()
            if c == "]" and not first:
                self.i += 1
                break
            first = False
            at = self.i
            lo = self.class_item()
            if self.peek() == "-" and self.peek(1) not in ("]", ""):
                self.i += 1
                hi = self.class_item()
                if len(lo) != 1 or len(hi) != 1 or lo[0][0] != lo[0][1] or hi[0][0] != hi[0][1]:
                    raise self.error("a range with a class (\\d, \\w, \\s) at an end", at)
                if hi[0][0] < lo[0][0]:
                    raise self.error(f"a reversed range {self.p[at : self.i]!r}", at)
                ranges.append((lo[0][0], hi[0][0]))
            else:
                ranges.extend(lo)
        merged = normalize(ranges)
        return negate(merged) if negated else merged

    def class_item(self) -> Ranges:
        c = self.peek()
        self.i += 1
        if c == "\\":
            return self.escape(in_class=True)
        return ((ord(c), ord(c)),)

    def escape(self, in_class: bool) -> Ranges:
        """The set an escape stands for (past its backslash)."""
        start = self.i - 1
        if self.i >= len(self.p):
            raise self.error("a trailing backslash", start)
        c = self.peek()
        self.i += 1
        if c in "dDwWsS":
            ranges = _CLASS_ESCAPES[c.lower()]
            return negate(ranges) if c.isupper() else ranges
        if c in _CHAR_ESCAPES:
            return ((_CHAR_ESCAPES[c],) * 2,)
        if c == "b" and in_class:
            return ((0x08, 0x08),)
        if c in HEX_DIGITS:
            digits = self.hex_digits(c)
            if digits is None:
                raise self.error(f"an escape \\{c} without {HEX_DIGITS[c]} hex digits", start)
            code = int(digits, 16)
            if code > MAX_CODE_POINT:
                raise self.error(f"an escape past U+10FFFF ({self.p[start : self.i]})", start)
            return ((code, code),)
        if c.isdigit() and c.isascii():
            raise self.unsupported(f"a backreference or octal escape '\\{c}'", start)
        if c in _ANCHORS and not in_class:
            raise self.unsupported(f"{_ANCHORS[c]} '\\{c}'", start)
        if c.isascii() and c.isalpha():  # (re refuses these too)
            raise self.unsupported(f"the escape '\\{c}'", start)
        return ((ord(c), ord(c)),)  # escaped punctuation (or any other character): itself
