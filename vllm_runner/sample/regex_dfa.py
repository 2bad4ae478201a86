"""guided_regex's automaton: a pattern (``regex_parse.py``'s subset of Python ``re``, matched
whole) as a DFA over UTF-8 bytes, the unit in which tokens write text.

Each set of code points becomes the byte-range sequences of its UTF-8 encodings (surrogates
have none: no output can hold them), a Thompson NFA joins them, and subset construction
makes the DFA over byte classes (the bytes the pattern never tells apart share one column,
so a step of the construction costs a class, not a byte). States from which no accepting
state is reachable are merged into the dead state 0: a token is then allowed exactly when
its bytes never reach it (``regex_masks.py``). The table is [states, 256] int32, for the
vectorized pass over the vocabulary. Compiled DFAs are kept by pattern in one bounded LRU
per process: a DFA does not depend on the vocabulary, and SamplingParams' validation, the
input checks and every engine of the process then compile a pattern once.
"""

import functools
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from vllm_runner.sample.regex_parse import Chars, Concat, Either, Ranges, Repeat, parse, shown

MAX_NFA_STATES = 50_000
MAX_DFA_STATES = 10_000  # a table of 10 MiB (int32 x 256 a state)
DFA_CACHE_BYTES = 64 << 20  # compiled tables kept per process
DEAD, START = 0, 1
_ALL_BYTES = (1 << 256) - 1
# code points by the length of their UTF-8 encoding (surrogates, which have none, left out)
_SPANS = ((0, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF))


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


class _TooManyStates(Exception):
    """(which automaton, its limit)"""


class _Nfa:
    """Thompson's construction: each state has epsilon moves and byte moves (a target's
    256-bit mask of bytes)."""

    def __init__(self) -> None:
        self.eps: list[list[int]] = []
        self.moves: list[dict[int, int]] = []  # target -> byte mask

    def state(self) -> int:
        if len(self.eps) >= MAX_NFA_STATES:
            raise _TooManyStates("NFA", MAX_NFA_STATES)
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


@dataclass(eq=False)
class RegexDfa:
    """A pattern's DFA over bytes: state 0 is dead (no match can follow), 1 the start."""

    pattern: str
    table: np.ndarray  # [states, 256] int32: the state after a byte
    accepting: np.ndarray  # [states] bool: the text so far matches

    @property
    def num_states(self) -> int:
        return self.table.shape[0]

    def run(self, data: bytes, state: int = START) -> int:
        for b in data:
            state = int(self.table[state, b])
            if state == DEAD:
                break
        return state

    def fullmatch(self, text: str) -> bool:
        """Whether the whole of ``text`` matches (as ``re.fullmatch``, in the subset)."""
        return bool(self.accepting[self.run(text.encode())])


def compile_regex(pattern: str) -> RegexDfa:
    """ValueError naming what the pattern holds that is not taken, or the limit it passes."""
    tree = parse(pattern)
    nfa = _Nfa()
    try:
        entry, accept = nfa.build(tree)
        table, accepting = _subsets(nfa, entry, accept)
    except _TooManyStates as e:
        which, limit = e.args
        raise ValueError(
            f"guided_regex {shown(pattern)}: more than {limit} {which} states (the limit): "
            "bounded repeats {n,m} of large groups multiply the states; bound them less"
        ) from None
    if not accepting.any():
        raise ValueError(f"guided_regex {shown(pattern)} matches no text (in UTF-8)")
    return RegexDfa(pattern, table, accepting)


def _byte_classes(nfa: _Nfa) -> list[int]:
    """The bytes as classes (256-bit masks) that no move of the NFA tells apart (in one
    order for a pattern: its DFA's states are numbered alike whenever it is compiled)."""
    classes = [_ALL_BYTES]
    for mask in sorted({m for moves in nfa.moves for m in moves.values()}):
        classes = [part for c in classes for part in (c & mask, c & ~mask) if part]
    return classes


def _subsets(nfa: _Nfa, entry: int, accept: int) -> tuple[np.ndarray, np.ndarray]:
    """Subset construction over byte classes; a DFA state is the bit set of the NFA states
    with byte moves (and the accepting one) that its epsilon closure holds."""
    keyed = [s for s in range(len(nfa.eps)) if nfa.moves[s]] + [accept]
    closure = _closures(nfa, {s: 1 << k for k, s in enumerate(keyed)})
    classes = _byte_classes(nfa)
    in_mask: dict[int, list[int]] = {}  # a move's mask -> the classes it holds
    moves: list[list[tuple[int, int]]] = []  # per keyed state: (class, closure after)
    for s in keyed:
        after: dict[int, int] = {}
        for target, mask in nfa.moves[s].items():
            if mask not in in_mask:
                in_mask[mask] = [ci for ci, c in enumerate(classes) if c & mask]
            for ci in in_mask[mask]:
                after[ci] = after.get(ci, 0) | closure[target]
        moves.append([(ci, bits) for ci, bits in after.items() if bits])  # (0: a dead end)
    sets = [closure[entry]]
    index = {sets[0]: START}
    rows = []
    for current in sets:  # (grows as states are found)
        after, keys = {}, current
        while keys:  # each keyed state the set holds
            low = keys & -keys
            for ci, bits in moves[low.bit_length() - 1]:
                after[ci] = after.get(ci, 0) | bits
            keys ^= low
        row = [DEAD] * len(classes)
        for ci, bits in after.items():
            if bits not in index:
                if len(sets) + 1 >= MAX_DFA_STATES:  # (the dead state counts)
                    raise _TooManyStates("DFA", MAX_DFA_STATES)
                index[bits] = len(sets) + 1
                sets.append(bits)
            row[ci] = index[bits]
        rows.append(row)
    trans = np.array([[DEAD] * len(classes), *rows], np.int32)  # [states, classes]
    accepting = np.array([False] + [bool(s >> (len(keyed) - 1) & 1) for s in sets])
    trans, accepting = _live_only(trans, accepting)
    column = np.zeros(256, np.int64)  # byte -> class
    for ci, c in enumerate(classes):
        column[[b for b in range(256) if c >> b & 1]] = ci
    return np.ascontiguousarray(trans[:, column]), accepting


def _closures(nfa: _Nfa, bit: dict[int, int]) -> list[int]:
    """Per NFA state, the bits of the keyed states its epsilon moves reach (itself too)."""
    closure = [bit.get(s, 0) for s in range(len(nfa.eps))]
    changed = True
    while changed:  # to a fixpoint: states run last to first, a repeat's loop back needs more
        changed = False
        for s in reversed(range(len(nfa.eps))):
            c = closure[s]
            for t in nfa.eps[s]:
                c |= closure[t]
            if c != closure[s]:
                closure[s], changed = c, True
    return closure


def _live_only(trans: np.ndarray, accepting: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The states from which an accepting one is reachable (the dead state 0 first, the
    start next if live), the others' moves sent to the dead state."""
    states = trans.shape[0]
    edges = np.unique(trans.astype(np.int64) * states + np.arange(states)[:, None])
    dst, src = np.divmod(edges, states)  # (each move once, by its target)
    bounds = np.searchsorted(dst, np.arange(states + 1)).tolist()
    src = src.tolist()
    live = accepting.tolist()
    todo = [s for s in range(states) if live[s]]
    while todo:  # backwards from the accepting states
        s = todo.pop()
        for p in src[bounds[s] : bounds[s + 1]]:
            if not live[p]:
                live[p] = True
                todo.append(p)
    live[DEAD] = True
    keep = np.array(live)
    renumber = np.cumsum(keep) - 1  # (DEAD stays 0)
    renumber[~keep] = DEAD
    return renumber[trans[keep]].astype(np.int32), accepting[keep]


_cache: OrderedDict[str, RegexDfa] = OrderedDict()
_cache_bytes = 0
_cache_lock = threading.Lock()  # (front-end threads and the engine's loop share it)


def compiled(pattern: str) -> RegexDfa:
    """``compile_regex(pattern)``, from the process's bounded LRU when it is there."""
    global _cache_bytes
    with _cache_lock:
        dfa = _cache.get(pattern)
        if dfa is not None:
            _cache.move_to_end(pattern)
            return dfa
    dfa = compile_regex(pattern)  # (outside the lock: two threads may both compile one)
    with _cache_lock:
        if pattern not in _cache:
            _cache[pattern] = dfa
            _cache_bytes += dfa.table.nbytes
        while _cache_bytes > DFA_CACHE_BYTES and len(_cache) > 1:
            _, old = _cache.popitem(last=False)
            _cache_bytes -= old.table.nbytes
    return dfa


@dataclass
class RegexCursor:
    """Where a request's output stands in its pattern's DFA; advanced by its new tokens."""

    dfa: RegexDfa
    state: int = START
    consumed: int = 0  # output tokens read
    ended: bool = False  # an end token came where the text matched
    broken: bool = False  # a token left the pattern (cannot be sampled under the mask)

    @property
    def accepts(self) -> bool:
        return bool(self.dfa.accepting[self.state])

    def feed(self, data: bytes) -> bool:
        """Advance by ``data``; False (the cursor then broken) if no match can follow."""
        self.state = self.dfa.run(data, self.state)
        self.broken = self.state == DEAD
        return not self.broken
