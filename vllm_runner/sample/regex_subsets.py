"""guided_regex's subset construction: the NFA of ``regex_nfa.py`` as a DFA over byte classes
(the bytes no move tells apart share one column, so a step costs a class, not a byte).

A DFA state is the bit set of the keyed NFA states its threads are in: those with byte moves,
the accepting one, and (kept only while a step is worked out) each Loop's ``end``. Only live
NFA states are keyed (``Nfa.live``): every non-empty set is live, and the dead state 0 is the
empty one, so a token is allowed exactly when its bytes never reach it.

Counted Loops: a state's *slots* are the Loops its threads are in (in the NFA's order), each
with one count, which the DFA's user carries beside the state: every thread of a Loop must
have the same count, else the Loop is ``Ambiguous`` and is written out as copies instead
(e.g. ``(a|b)*a(a|b){99}``, whose DFA is then refused by the state limit, as it must be:
it has to remember 99 bytes). A transition keeps the slots as they are (an entry of the
table: the next state), or is a counter *step*: its entry is ``-1 - step``. A step names
the Loops whose iteration the byte may end (its *events*); each decides by its count's class
after that iteration, ``(count >= low) + (count >= high)``: 0 go round, 1 go round or
leave, 2 leave. The classes pick one of the step's *edges*: the next state and, per slot of
it, the count it starts from: a slot of the state before (plus one if its iteration ended)
or 0 (a Loop entered from outside).
"""

from dataclasses import dataclass
from itertools import product

import numpy as np

from vllm_runner.sample.regex_nfa import Nfa, TooManyStates

MAX_DFA_STATES = 10_000  # a table of 10 MiB (int32 x 256 a state)
# NOTE: a bound on the construction's work, a step (~3 us) per NFA state each DFA state
# holds: ~1.5 s. A pattern of few DFA states that each hold thousands of NFA states
# (``(?:a?){0,10000}``, written out as copies) took minutes before MAX_DFA_STATES refused it;
# realistic ones hold far less (the sample JSON schemas: ~32,000 at most, in 9,757 states).
MAX_HELD = 500_000
MAX_EVENTS = 3  # Loops one byte may end an iteration of (3 ** 3 edges a step at most)
MAX_BRANCHES = 100_000  # edges worked out in one construction (past it: copies instead)
DEAD, START = 0, 1
_KEEP, _INC, _RESET = range(3)


class Ambiguous(Exception):
    """(the ids of the tree's repeats to write out as copies)"""


@dataclass
class Subsets:
    """A DFA by byte class, with its counter steps (all empty without Loops)."""

    classes: list[int]  # 256-bit byte masks
    rows: list[list[int]]  # per state, per class: the next state, or -1 - a step
    accepting: list[bool]
    slots: list[tuple[tuple[int, int | None], ...]]  # per state: its Loops' (low, high)
    steps: list[tuple[tuple[tuple[int, int, int | None], ...], tuple[int, ...]]]
    # per step: (its events' (slot, low, high), its edges by sum(class * 3 ** event))
    edges: list[tuple[int, tuple[tuple[int, int, int | None], ...]]]
    # per edge: (the next state, per slot of it (the slot before or -1: 0, plus, cap))


def subsets(nfa: Nfa, entry: int, accept: int) -> Subsets:
    """The DFA of ``nfa`` from ``entry``; Ambiguous or TooManyStates (see above)."""
    return _Builder(nfa, accept).run(entry)


class _Builder:
    """One construction: the NFA's keyed states as bits, the states and steps found."""

    def __init__(self, nfa: Nfa, accept: int) -> None:
        live = nfa.live(accept)
        self.loops = nfa.loops
        ends = {loop.end: i for i, loop in enumerate(nfa.loops) if live[loop.end]}
        keyed = [s for s in range(len(nfa.eps)) if live[s] and (nfa.moves[s] or s in ends)]
        keyed.append(accept)
        bit = {s: 1 << k for k, s in enumerate(keyed)}
        self.accept_bit = bit[accept]
        self.closure = nfa.closures(bit)
        self.end_of = {bit[s].bit_length() - 1: i for s, i in ends.items()}  # a bit -> its Loop
        self.end_bits = sum(bit[s] for s in ends)
        innermost = np.full(len(nfa.eps), -1)  # per NFA state: the innermost Loop it is in
        for i in reversed(range(len(nfa.loops))):  # (outer Loops come last: first here)
            innermost[nfa.loops[i].first : nfa.loops[i].stop] = i
        innermost = innermost.tolist()
        self.parent = [innermost[loop.first - 1] for loop in nfa.loops]  # (its entry's)
        self.inner = [-1 if s in ends else innermost[s] for s in keyed]  # per keyed state
        self.masks = [0] * len(nfa.loops)  # per Loop: the bits of its threads
        for s, i in zip(keyed, self.inner, strict=True):
            while i >= 0:
                self.masks[i] |= bit[s]
                i = self.parent[i]
        self.loop_bits = sum(bit[s] for s, i in zip(keyed, self.inner, strict=True) if i >= 0)
        self.classes = nfa.byte_classes()
        in_mask: dict[int, list[int]] = {}  # a move's mask -> the classes it holds
        self.moves: list[list[tuple[int, int]]] = []  # per keyed state: (class, closure after)
        for s in keyed:
            after: dict[int, int] = {}
            for target, mask in nfa.moves[s].items():
                if mask not in in_mask:
                    in_mask[mask] = [ci for ci, c in enumerate(self.classes) if c & mask]
                for ci in in_mask[mask]:
                    after[ci] = after.get(ci, 0) | self.closure[target]
            self.moves.append([(ci, bits) for ci, bits in after.items() if bits])
        self.sets: list[int] = []
        self.index: dict[int, int] = {}
        self.slots: list[tuple[int, ...]] = []  # per state: its Loops
        self.steps: dict[tuple, int] = {}
        self.edge_list: list[tuple] = [(DEAD, ())]  # (edge 0: the dead one)
        self.edges: dict[tuple, int] = {self.edge_list[0]: 0}
        self.branches = self.held = 0

    def run(self, entry: int) -> Subsets:
        self.intern(self.closure[entry])  # (START, maybe empty: then nothing matches)
        rows = []
        while len(rows) < len(self.sets):  # (states are found as it goes)
            at = len(rows)
            after: dict[int, dict[int, int]] = {}  # class -> innermost Loop before -> bits
            keys = self.sets[at]
            self.held += keys.bit_count()
            if self.held > MAX_HELD:
                raise TooManyStates("NFA states held by its DFA states together", MAX_HELD)
            while keys:  # each keyed state the set holds
                low = keys & -keys
                k = low.bit_length() - 1
                for ci, bits in self.moves[k]:
                    by_loop = after.setdefault(ci, {})
                    by_loop[self.inner[k]] = by_loop.get(self.inner[k], 0) | bits
                keys ^= low
            row = [DEAD] * len(self.classes)
            for ci, by_loop in after.items():
                row[ci] = self.transition(self.slots[at], by_loop)
            rows.append(row)
        bounds = [(loop.low, loop.high) for loop in self.loops]
        return Subsets(
            classes=self.classes,
            rows=[[DEAD] * len(self.classes), *rows],
            accepting=[False] + [bool(s & self.accept_bit) for s in self.sets],
            slots=[(), *(tuple(bounds[i] for i in slots) for slots in self.slots)],
            steps=list(self.steps),
            edges=self.edge_list,
        )

    def intern(self, bits: int) -> int:
        if bits not in self.index:
            if len(self.sets) + 2 > MAX_DFA_STATES:  # (the dead state counts)
                raise TooManyStates("DFA states", MAX_DFA_STATES)
            self.index[bits] = len(self.sets) + 1
            self.sets.append(bits)
            self.slots.append(self.slots_of(bits))
        return self.index[bits]

    def slots_of(self, bits: int) -> tuple[int, ...]:
        """The Loops the threads of ``bits`` are in, in the NFA's order."""
        held = set()
        for k in _ones(bits & self.loop_bits):
            i = self.inner[k]
            while i >= 0 and i not in held:
                held.add(i)
                i = self.parent[i]
        return tuple(sorted(held, key=lambda i: self.loops[i].first))

    def ended(self, bits: int) -> list[int]:
        """The Loops whose ``end`` is in ``bits``."""
        return [self.end_of[k] for k in _ones(bits & self.end_bits)]

    def transition(self, before: tuple[int, ...], by_loop: dict[int, int]) -> int:
        """A table entry: the state after a byte class, or -1 - its step."""
        moved = 0
        for bits in by_loop.values():
            moved |= bits
        if not before and not moved & (self.loop_bits | self.end_bits):
            return self.intern(moved)  # (no count before or after)
        events, todo = [], self.ended(moved)
        while todo:  # (every Loop a branch may end: more than any one branch ends)
            i = todo.pop()
            if i not in events:
                events.append(i)
                loop = self.loops[i]
                todo += self.ended(self.closure[loop.start] | self.closure[loop.out])
        events.sort()
        if len(events) > MAX_EVENTS:
            raise Ambiguous({self.loops[i].node for i in events})
        edges = [0] * 3 ** len(events)  # (a class no count can have: the dead edge)
        for classes in product(*(self.feasible(i) for i in events)):
            code = sum(c * 3**k for k, c in enumerate(classes))
            chosen = dict(zip(events, classes, strict=True))
            edges[code] = self.branch(before, by_loop, moved, chosen)
        target, ops = self.edge_list[edges[0]]
        kept = all(src == k and not plus for k, (src, plus, _) in enumerate(ops))
        if not events and kept and (target == DEAD or self.slots[target - 1] == before):
            return target  # (the counts as they were)
        event_slots = tuple((before.index(i), self.loops[i].low, self.loops[i].high)
                            for i in events)  # fmt: skip
        return -1 - self.steps.setdefault((event_slots, tuple(edges)), len(self.steps))

    def feasible(self, i: int) -> list[int]:
        """The classes a count can have after an iteration of Loop ``i`` (from 1 to high,
        or to low + 1 unbounded: the count stops at low)."""
        loop = self.loops[i]
        classes = [0] if loop.low >= 2 else []
        if loop.high is None or max(loop.low, 1) < loop.high:
            classes.append(1)
        return classes + [2] if loop.high is not None else classes

    def branch(self, before: tuple[int, ...], by_loop: dict[int, int], moved: int,
               classes: dict[int, int]) -> int:  # fmt: skip
        """The edge of one choice of the events' classes: the threads the byte moved, then
        those of each Loop it ended, round again and / or on; each part's threads have a
        Loop's count as it was, plus one, or from 0 (``_kind``)."""
        self.branches += 1
        if self.branches > MAX_BRANCHES:  # (a bound on the work: copies have their limits)
            raise Ambiguous({loop.node for loop in self.loops})
        parts = [(anchor, -1, bits) for anchor, bits in by_loop.items()]
        bits, done, todo = moved, set(), self.ended(moved)
        while todo:
            i = todo.pop()
            if i in done:
                continue
            done.add(i)
            loop = self.loops[i]
            ways = [(i, i, self.closure[loop.start])] if classes[i] < 2 else []
            if classes[i] > 0:
                ways.append((self.parent[i], -1, self.closure[loop.out]))
            for way in ways:
                parts.append(way)
                bits |= way[2]
                todo += self.ended(way[2])
        bits &= ~self.end_bits
        target = self.intern(bits) if bits else DEAD
        ops = []
        for j in self.slots_of(bits):
            mask = self.masks[j]
            kinds = {self._kind(anchor, again, j) for anchor, again, b in parts if b & mask}
            if len(kinds) > 1:  # (threads of one Loop with two counts)
                raise Ambiguous({self.loops[j].node})
            kind, loop = kinds.pop(), self.loops[j]
            src = -1 if kind == _RESET else before.index(j)
            ops.append((src, int(kind == _INC), loop.low if loop.high is None else None))
        key = (target, tuple(ops))
        if key not in self.edges:
            self.edges[key] = len(self.edge_list)
            self.edge_list.append(key)
        return self.edges[key]

    def _kind(self, anchor: int, again: int, j: int) -> int:
        """How the count of Loop ``j`` goes for a part's threads: ``anchor`` the innermost
        Loop they stayed in, ``again`` the Loop whose iteration they start again (or -1)."""
        if again == j:
            return _INC
        if anchor >= 0 and self.loops[j].holds(self.loops[anchor]):
            return _KEEP
        return _RESET  # (entered from outside it)


def _ones(bits: int) -> list[int]:
    """The indices of the set bits."""
    out = []
    while bits:
        low = bits & -bits
        out.append(low.bit_length() - 1)
        bits ^= low
    return out
