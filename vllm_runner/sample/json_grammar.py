"""JSON mode's recognizer: which bytes may come next in one JSON object (RFC 8259's grammar,
a top-level object as OpenAI's JSON mode), byte by byte.

A state is a lexical state (what may come next), the run of whitespace bytes just written
between tokens of the grammar, and the stack of open brackets. The lexical transitions are
one table over (state, byte), which the cursor following a request's output (``JsonCursor``)
and the vectorized pass over the whole vocabulary that makes a mask (``json_masks.py``)
share. Strings take any byte >= 0x20 but ``"`` and ``\\`` (UTF-8 is not checked: an invalid
sequence decodes to U+FFFD, still a valid string).
"""

from dataclasses import dataclass, field

import numpy as np

# NOTE: at most this many whitespace bytes in a row outside strings: a model cannot loop on
# newlines forever, and a newline with 15 spaces of indentation still fits pretty-printing.
MAX_WHITESPACE = 16

# Lexical states: what may come next.
(START, OBJ_OPEN, OBJ_NEXT, KEY, KEY_ESC, KEY_U1, KEY_U2, KEY_U3, KEY_U4, COLON, VALUE,
 ARR_OPEN, STR, STR_ESC, STR_U1, STR_U2, STR_U3, STR_U4, AFTER, MINUS, ZERO, INT, DOT, FRAC,
 EXP, EXP_SIGN, EXP_INT, T1, T2, T3, F1, F2, F3, F4, N1, N2, N3, DONE) = range(38)  # fmt: skip
NUM_STATES = 38
IN_STRING = (KEY, STR)  # where a token of plain string bytes keeps the state (json_masks.py)

# What a byte does beyond the table's next state. A pop's next state is AFTER, or DONE when
# it empties the stack; a comma's is VALUE in an array, OBJ_NEXT (a key) in an object.
NONE, WS, PUSH_OBJ, PUSH_ARR, POP_OBJ, POP_ARR, COMMA = range(7)
OBJ, ARR = 0, 1  # stack entries

_WHITESPACE = b" \t\n\r"
_DIGITS = b"0123456789"
_HEX = b"0123456789abcdefABCDEF"


def _tables() -> tuple[np.ndarray, np.ndarray]:
    """[NUM_STATES, 256] int8 each: the next lexical state (-1: the byte leaves JSON) and
    the byte's action."""
    nxt = np.full((NUM_STATES, 256), -1, np.int8)
    act = np.zeros((NUM_STATES, 256), np.int8)

    def on(state: int, chars: bytes, to: int, action: int = NONE) -> None:
        for b in chars:
            nxt[state, b], act[state, b] = to, action

    for s in (START, OBJ_OPEN, OBJ_NEXT, COLON, VALUE, ARR_OPEN, AFTER, DONE):
        on(s, _WHITESPACE, s, WS)
    on(START, b"{", OBJ_OPEN, PUSH_OBJ)
    on(OBJ_OPEN, b'"', KEY)
    on(OBJ_OPEN, b"}", AFTER, POP_OBJ)
    on(OBJ_NEXT, b'"', KEY)
    on(COLON, b":", VALUE)
    strings = ((KEY, KEY_ESC, KEY_U1, KEY_U2, KEY_U3, KEY_U4, COLON),
               (STR, STR_ESC, STR_U1, STR_U2, STR_U3, STR_U4, AFTER))  # fmt: skip
    for text, esc, u1, u2, u3, u4, after in strings:
        on(text, bytes(range(0x20, 256)), text)
        on(text, b'"', after)
        on(text, b"\\", esc)
        on(esc, b'"\\/bfnrt', text)
        on(esc, b"u", u1)
        for a, b in ((u1, u2), (u2, u3), (u3, u4), (u4, text)):
            on(a, _HEX, b)
    for s in (VALUE, ARR_OPEN):  # a value starts
        on(s, b'"', STR)
        on(s, b"{", OBJ_OPEN, PUSH_OBJ)
        on(s, b"[", ARR_OPEN, PUSH_ARR)
        on(s, b"-", MINUS)
        on(s, b"0", ZERO)
        on(s, b"123456789", INT)
        on(s, b"t", T1)
        on(s, b"f", F1)
        on(s, b"n", N1)
    on(ARR_OPEN, b"]", AFTER, POP_ARR)
    on(MINUS, b"0", ZERO)
    on(MINUS, b"123456789", INT)
    on(INT, _DIGITS, INT)
    on(ZERO, b".", DOT)
    on(INT, b".", DOT)
    on(DOT, _DIGITS, FRAC)
    on(FRAC, _DIGITS, FRAC)
    for s in (ZERO, INT, FRAC):
        on(s, b"eE", EXP)
    on(EXP, b"+-", EXP_SIGN)
    on(EXP, _DIGITS, EXP_INT)
    on(EXP_SIGN, _DIGITS, EXP_INT)
    on(EXP_INT, _DIGITS, EXP_INT)
    for states, word in (((T1, T2, T3), b"rue"), ((F1, F2, F3, F4), b"alse"),
                         ((N1, N2, N3), b"ull")):  # fmt: skip
        for state, to, b in zip(states, (*states[1:], AFTER), word, strict=True):
            on(state, bytes([b]), to)
    for s in (AFTER, ZERO, INT, FRAC, EXP_INT):  # a value ends (a number: at the next byte)
        on(s, b",", VALUE, COMMA)
        on(s, b"}", AFTER, POP_OBJ)
        on(s, b"]", AFTER, POP_ARR)
    for s in (ZERO, INT, FRAC, EXP_INT):
        on(s, _WHITESPACE, AFTER, WS)
    return nxt, act


NEXT, ACTION = _tables()


@dataclass
class JsonCursor:
    """Where a request's output stands in its JSON object; advanced by its new tokens."""

    state: int = START
    run: int = 0  # whitespace bytes just written (outside strings)
    stack: list[int] = field(default_factory=list)  # OBJ / ARR, innermost last
    consumed: int = 0  # output tokens read
    ended: bool = False  # an end token came after the whole object
    broken: bool = False  # a token left JSON (cannot be sampled under the mask)

    @property
    def accepts(self) -> bool:
        return self.state == DONE

    def feed(self, data: bytes) -> bool:
        """Advance by ``data``; False (the cursor then broken) if it leaves JSON."""
        for b in data:
            if not self._byte(b):
                self.broken = True
                return False
        return True

    def _byte(self, b: int) -> bool:
        to, action = int(NEXT[self.state, b]), int(ACTION[self.state, b])
        if to < 0:
            return False
        self.run = self.run + 1 if action == WS else 0
        if self.run > MAX_WHITESPACE:
            return False
        if action in (PUSH_OBJ, PUSH_ARR):
            self.stack.append(OBJ if action == PUSH_OBJ else ARR)
        elif action in (POP_OBJ, POP_ARR):
            if not self.stack or self.stack[-1] != (OBJ if action == POP_OBJ else ARR):
                return False
            self.stack.pop()
            to = AFTER if self.stack else DONE
        elif action == COMMA:
            to = OBJ_NEXT if self.stack[-1] == OBJ else VALUE
        self.state = to
        return True

    def key(self, depth: int) -> tuple[int, int, tuple[int, ...], bool]:
        """The state as far as a token closing fewer than ``depth`` brackets can see it: the
        lexical state, the whitespace run, the innermost ``depth`` stack entries, and
        whether they are the whole stack."""
        return self.state, self.run, tuple(self.stack[-depth:]), len(self.stack) <= depth


def is_json_object(data: bytes) -> bool:
    """Whether ``data`` is one whole JSON object (whitespace around it up to the bound)."""
    cursor = JsonCursor()
    return cursor.feed(data) and cursor.accepts


def is_json_prefix(data: bytes) -> bool:
    """Whether ``data`` can be continued into one JSON object."""
    return JsonCursor().feed(data)
