"""guided_regex's NFA: a parsed pattern (``regex_parse.py``) as a Thompson automaton over
UTF-8 bytes, for ``regex_subsets.py``'s subset construction.

Each set of code points becomes the byte-range sequences of its UTF-8 encodings (surrogates
have none: no output can hold them). A repeat is written out as copies of its body, except a
counted one (``Loop``): one copy of the body and a counter of its iterations, which the DFA
carries beside its state. NOTE: copies of ``x{0,n}`` make a DFA of about n states per state
of ``x`` (a JSON string's ``maxLength`` 1,000: 16,000 states), a counter keeps it at ``x``'s.
"""

import functools
from dataclasses import dataclass

from vllm_runner.sample.regex_parse import Chars, Concat, Either, Ranges, Repeat

MAX_NFA_STATES = 50_000
# A repeat counted past this is a Loop (when its body cannot match the empty text: each
# iteration then reads a byte, so a byte ends one at most). NOTE: smaller ones stay copies:
# a plain DFA's new state costs a third of a counted one's mask pass over a vocabulary
# (~6 vs ~15 ms, 49k tokens), and a count's masks are shared only further from its bound
# than the longest token (``Counters.horizon_key``: 81 bytes for SmolLM2).
COUNTED_REPEAT = 128
# code points by the length of their UTF-8 encoding (surrogates, which have none, left out)
_SPANS = ((0, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF))
_ALL_BYTES = (1 << 256) - 1


class TooManyStates(Exception):
    """(what passed its limit, the limit)"""


@functools.lru_cache(maxsize=1024)  # (a repeat's copies of one set ask again)
def utf8_sequences(ranges: Ranges) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Byte-range sequences whose byte strings are exactly the UTF-8 encodings of the code
    points in ``ranges``."""
    out = []
    for lo, hi in ranges:
        for a, b in _SPANS:
            first, last = max(lo, a), min(hi, b)
            if first <= last:
                out += _between(chr(first).encode(), chr(last).encode())
    return tuple(out)


def _between(lo: bytes, hi: bytes) -> list[tuple[tuple[int, int], ...]]:
    """The byte strings from ``lo`` to ``hi`` (encodings of one length; UTF-8 keeps the code
    points' order) as byte-range sequences."""
    if len(lo) == 1:
        return [((lo[0], hi[0]),)]
    if lo[0] == hi[0]:
        return [((lo[0], lo[0]), *rest) for rest in _between(lo[1:], hi[1:])]
    n = len(lo) - 1
    head, tail = [], []
    first, last = lo[0], hi[0]
    if lo[1:] != b"\x80" * n:  # the lead byte's upper part only
        head = [((first, first), *rest) for rest in _between(lo[1:], b"\xbf" * n)]
        first += 1
    if hi[1:] != b"\xbf" * n:
        tail = [((last, last), *rest) for rest in _between(b"\x80" * n, hi[1:])]
        last -= 1
    middle = [((first, last), *((0x80, 0xBF),) * n)] if first <= last else []
    return head + middle + tail


def nullable(node) -> bool:
    """Whether ``node`` matches the empty text."""
    if isinstance(node, Chars):
        return False
    if isinstance(node, Concat):
        return all(nullable(part) for part in node.parts)
    if isinstance(node, Either):
        return any(nullable(option) for option in node.options)
    return node.low == 0 or nullable(node.node)


def countable(tree) -> set[int]:
    """The ids of the tree's repeats that may be counted Loops (see COUNTED_REPEAT)."""
    out: set[int] = set()
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, Concat | Either):
            todo += node.parts if isinstance(node, Concat) else node.options
        elif isinstance(node, Repeat):
            count = node.low if node.high is None else node.high
            if count > COUNTED_REPEAT and not nullable(node.node):
                out.add(id(node))
            todo.append(node.node)
    return out


@dataclass(frozen=True)
class Loop:
    """A counted repeat: its body's NFA states are ``range(first, stop)``; a thread entering
    it from outside starts at count 0, one reaching ``end`` has read an iteration more and
    goes back to ``start`` while below ``high`` and on to ``out`` from ``low`` on."""

    node: int  # id() of the tree's Repeat (an outer repeat's copies share it)
    low: int
    high: int | None  # None: unbounded (the count then stops at ``low``)
    first: int
    stop: int
    start: int
    end: int
    out: int

    def holds(self, other: "Loop") -> bool:
        """Whether ``other`` is this loop or inside its body."""
        return self.first <= other.first and other.stop <= self.stop


class Nfa:
    """Thompson's construction: each state has epsilon moves and byte moves (a target's
    256-bit mask of bytes); ``counted``: the ids of the repeats built as Loops."""

    def __init__(self, counted: set[int]) -> None:
        self.counted = counted
        self.eps: list[list[int]] = []
        self.moves: list[dict[int, int]] = []  # target -> byte mask
        self.loops: list[Loop] = []  # (inner ones first: a body is built before its loop)

    def state(self) -> int:
        if len(self.eps) >= MAX_NFA_STATES:
            raise TooManyStates("NFA states", MAX_NFA_STATES)
        self.eps.append([])
        self.moves.append({})
        return len(self.eps) - 1

    def build(self, node) -> tuple[int, int]:
        """(entry, exit) of a fragment for ``node``; the exit has no moves yet."""
        if isinstance(node, Chars):
            return self._chars(node.ranges)
        if isinstance(node, Concat):
            entry = end = self.state()
            for part in node.parts:
                start, stop = self.build(part)
                self.eps[end].append(start)
                end = stop
            return entry, end
        if isinstance(node, Either):
            entry, end = self.state(), self.state()
            for option in node.options:
                start, stop = self.build(option)
                self.eps[entry].append(start)
                self.eps[stop].append(end)
            return entry, end
        assert isinstance(node, Repeat), node
        if id(node) in self.counted:
            return self._loop(node)
        entry = end = self.state()
        for _ in range(node.low):
            start, stop = self.build(node.node)
            self.eps[end].append(start)
            end = stop
        if node.high is None:  # a hub: into the body again, or on
            hub = self.state()
            self.eps[end].append(hub)
            start, stop = self.build(node.node)
            self.eps[hub].append(start)
            self.eps[stop].append(hub)
            return entry, hub
        out = self.state()
        for _ in range(node.high - node.low):
            start, stop = self.build(node.node)
            self.eps[end] += [start, out]
            end = stop
        self.eps[end].append(out)
        return entry, out

    def _loop(self, node: Repeat) -> tuple[int, int]:
        """One copy of the body; ``end``'s moves back and on are the Loop's, not epsilons:
        they depend on the count (``regex_subsets.py``)."""
        entry = self.state()
        first = len(self.eps)
        start, end = self.build(node.node)
        out = self.state()
        self.eps[entry].append(start)
        if node.low == 0:
            self.eps[entry].append(out)
        self.loops.append(Loop(id(node), node.low, node.high, first, out, start, end, out))
        return entry, out

    def _chars(self, ranges: Ranges) -> tuple[int, int]:
        """One character: its UTF-8 byte-range sequences, their common tails (the
        continuation bytes) shared."""
        entry, end = self.state(), self.state()
        tails: dict[tuple, int] = {(): end}

        def tail(rest: tuple) -> int:
            if rest not in tails:
                state = self.state()
                self._move(state, rest[0], tail(rest[1:]))
                tails[rest] = state
            return tails[rest]

        for first, *rest in utf8_sequences(ranges):
            self._move(entry, first, tail(tuple(rest)))
        return entry, end

    def _move(self, state: int, span: tuple[int, int], target: int) -> None:
        lo, hi = span
        mask = ((1 << (hi + 1)) - 1) ^ ((1 << lo) - 1)
        self.moves[state][target] = self.moves[state].get(target, 0) | mask

    def live(self, accept: int) -> list[bool]:
        """Per state, whether ``accept`` is reachable from it. NOTE: exact for Loops too,
        though it ignores their bounds: a thread inside a body can always end its iteration,
        go round (its count is below ``high``) until ``low``, then leave."""
        before: list[list[int]] = [[] for _ in self.eps]
        for s, (eps, moves) in enumerate(zip(self.eps, self.moves, strict=True)):
            for t in (*eps, *moves):
                before[t].append(s)
        for loop in self.loops:
            before[loop.start].append(loop.end)
            before[loop.out].append(loop.end)
        live = [False] * len(self.eps)
        live[accept] = True
        todo = [accept]
        while todo:
            for s in before[todo.pop()]:
                if not live[s]:
                    live[s] = True
                    todo.append(s)
        return live

    def byte_classes(self) -> list[int]:
        """The bytes as classes (256-bit masks) that no move tells apart (in one order for a
        pattern: its DFA's states are numbered alike whenever it is compiled)."""
        classes = [_ALL_BYTES]
        for mask in sorted({m for moves in self.moves for m in moves.values()}):
            classes = [part for c in classes for part in (c & mask, c & ~mask) if part]
        return classes

    def closures(self, bit: dict[int, int]) -> list[int]:
        """Per state, the bits of the keyed states its epsilon moves reach (itself too)."""
        closure = [bit.get(s, 0) for s in range(len(self.eps))]
        changed = True
        while changed:  # to a fixpoint: states run last to first, a loop back needs more
            changed = False
            for s in reversed(range(len(self.eps))):
                c = closure[s]
                for t in self.eps[s]:
                    c |= closure[t]
                if c != closure[s]:
                    closure[s], changed = c, True
        return closure
