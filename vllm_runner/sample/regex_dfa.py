"""guided_regex's automaton: a pattern (``regex_parse.py``'s subset of Python ``re``, matched
whole) as a DFA over UTF-8 bytes, the unit in which tokens write text.

The pattern's NFA (``regex_nfa.py``) keeps a repeat counted past COUNTED_REPEAT as one copy
and a counter; the subset construction (``regex_subsets.py``) makes a DFA whose transitions
carry such counts (``regex_counters.py``), and writes a repeat out as copies after all where
its count is not one number (then the DFA is what copies make, and the state limits say
whether it is too large). The table is [states, 256] int32, for the vectorized pass over the
vocabulary. Compiled DFAs are kept by pattern in one bounded LRU per process: a DFA does not
depend on the vocabulary, and SamplingParams' validation, the input checks and every engine
of the process then compile a pattern once.
"""

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from vllm_runner.sample.regex_counters import Counters
from vllm_runner.sample.regex_nfa import Nfa, TooManyStates, countable
from vllm_runner.sample.regex_parse import parse, shown
from vllm_runner.sample.regex_subsets import DEAD, START, Ambiguous, Subsets, subsets

DFA_CACHE_BYTES = 64 << 20  # compiled tables kept per process
_ATTEMPTS = 3  # constructions of a DFA at most (``_construct``)


@dataclass(eq=False)
class RegexDfa:
    """A pattern's DFA over bytes: state 0 is dead (no match can follow), 1 the start. With
    counted repeats, a state comes with its counts (``counters``): a table entry below 0 is
    then a counter step, ``-1 - step``, whose next state depends on them."""

    pattern: str
    table: np.ndarray  # [states, 256] int32: the state after a byte (or -1 - a step)
    accepting: np.ndarray  # [states] bool: the text so far matches
    counters: Counters | None = None  # (None: no counted repeat)

    @property
    def num_states(self) -> int:
        return self.table.shape[0]

    @property
    def nbytes(self) -> int:
        return self.table.nbytes + (self.counters.nbytes if self.counters else 0)

    def zeros(self, state: int) -> tuple[int, ...]:
        """The state's counts all 0 (the start's are)."""
        return (0,) * len(self.counters.slots[state]) if self.counters else ()

    def walk(self, data: bytes, state: int, counts: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
        """The state and counts after ``data``."""
        for b in data:
            state = int(self.table[state, b])
            if state < 0:
                state, counts = self.counters.step_one(-1 - state, counts)
            if state == DEAD:
                return DEAD, ()
        return state, counts

    def run(self, data: bytes, state: int = START, counts: tuple[int, ...] | None = None) -> int:
        """The state after ``data`` (``counts``: the state's, None: all 0)."""
        return self.walk(data, state, self.zeros(state) if counts is None else counts)[0]

    def fullmatch(self, text: str) -> bool:
        """Whether the whole of ``text`` matches (as ``re.fullmatch``, in the subset)."""
        return bool(self.accepting[self.run(text.encode())])


def compile_regex(pattern: str) -> RegexDfa:
    """ValueError naming what the pattern holds that is not taken, or the limit it passes."""
    tree = parse(pattern)
    try:
        sub = _construct(tree)
    except TooManyStates as e:
        what, limit = e.args
        raise ValueError(
            f"guided_regex {shown(pattern)}: more than {limit} {what} (the limit): "
            "bounded repeats {n,m} of large groups multiply the states; bound them less"
        ) from None
    if not any(sub.accepting):
        raise ValueError(f"guided_regex {shown(pattern)} matches no text (in UTF-8)")
    column = np.zeros(256, np.int64)  # byte -> class
    for ci, c in enumerate(sub.classes):
        column[[b for b in range(256) if c >> b & 1]] = ci
    table = np.ascontiguousarray(np.array(sub.rows, np.int32)[:, column])  # [states, 256]
    counters = Counters(sub) if any(sub.slots) else None
    return RegexDfa(pattern, table, np.array(sub.accepting), counters)


def _construct(tree) -> Subsets:
    """The DFA with every repeat counted that can be, then without those found Ambiguous,
    at last with none (copies alone, which the state limits bound)."""
    counted = countable(tree)
    for _ in range(_ATTEMPTS - 1):
        nfa = Nfa(counted)
        entry, accept = nfa.build(tree)
        try:
            return subsets(nfa, entry, accept)
        except Ambiguous as e:
            counted = counted - e.args[0]
    nfa = Nfa(set())
    return subsets(nfa, *nfa.build(tree))


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
            _cache_bytes += dfa.nbytes
        while _cache_bytes > DFA_CACHE_BYTES and len(_cache) > 1:
            _, old = _cache.popitem(last=False)
            _cache_bytes -= old.nbytes
    return dfa


@dataclass
class RegexCursor:
    """Where a request's output stands in its pattern's DFA; advanced by its new tokens."""

    dfa: RegexDfa
    state: int = START
    counts: tuple[int, ...] | None = None  # the state's counts (None: all 0, as at the start)
    consumed: int = 0  # output tokens read
    ended: bool = False  # an end token came where the text matched
    broken: bool = False  # a token left the pattern (cannot be sampled under the mask)

    def __post_init__(self) -> None:
        if self.counts is None:
            self.counts = self.dfa.zeros(self.state)

    @property
    def accepts(self) -> bool:
        return bool(self.dfa.accepting[self.state])

    def feed(self, data: bytes) -> bool:
        """Advance by ``data``; False (the cursor then broken) if no match can follow."""
        self.state, self.counts = self.dfa.walk(data, self.state, self.counts)
        self.broken = self.state == DEAD
        return not self.broken
