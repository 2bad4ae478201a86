"""guided_grammar's recognizer: a byte-level pushdown parser that keeps every parse at once,
over a compiled grammar (``grammar_compile.py``), and its states as a DFA made lazily.

A parse is a stack of positions in ``Grammar.elems`` (its top: the byte set it reads next;
under it, where each rule it is inside goes on). A parser state is the set of the parses the
text so far allows (a frozenset of stacks; the empty stack once the text is a whole
sentence), closed under expanding rules (``closure``). A return to the end of an
alternative is never pushed (the caller's end follows at once): a recursion in a tail
(``s ::= x s``) keeps a stack's height, and the closure meets its stacks again.

``GrammarStates`` numbers the states an engine meets and works out each one's 256
transitions once (bytes grouped by which parses take them), into a [states, 256] table for
the vectorized pass over the vocabulary (``grammar_masks.py``). Work is bounded: a state of
more than MAX_STACKS parses, or one whose closure meets more than MAX_CLOSURE stacks, is not
entered (the byte is not taken); a mask's pass works out at most MAX_PASS_WORK stacks (past
it, the tokens whose bytes need more are not allowed in that mask: shorter tokens write the
same text); an engine keeps MAX_STATES of a grammar's states (then starts again).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from vllm_runner.sample.grammar_compile import Grammar

END = -1  # in Grammar.elems: an alternative's end
DEAD = 0  # the state no text continues (no parse left)
MAX_STACKS = 1_000  # parses one state holds
MAX_CLOSURE = 20_000  # stacks met working out one transition
MAX_DEPTH = 1_000  # a parse's nesting (deeper ones are dropped)
MAX_PASS_WORK = 100_000  # stacks met in one mask's pass (~0.1-0.3 s on a CPU core)
MAX_STATES = 4_096  # a grammar's states kept (a [states, 256] int32 table: 4 MiB)


def closure(grammar: Grammar, seeds) -> frozenset | None:
    """The state of the parses ``seeds`` with their rules expanded; None past the limits."""
    state, _ = bounded_closure(grammar, seeds, MAX_CLOSURE)
    return state


def bounded_closure(grammar: Grammar, seeds, limit: int) -> tuple[frozenset | None, int]:
    """(the state, or None past ``limit`` stacks met or MAX_STACKS kept; the stacks met)."""
    elems, alts = grammar.elems, grammar.alts
    out: set[tuple[int, ...]] = set()
    seen: set[tuple[int, ...]] = set()
    todo = list(seeds)
    while todo:
        stack = todo.pop()
        if stack in seen:
            continue
        seen.add(stack)
        if len(seen) > limit:
            return None, len(seen)
        if not stack or elems[stack[-1]] >= 0:  # whole, or at a byte set
            out.add(stack)
            continue
        p = stack[-1]
        base = stack[:-1] if elems[p + 1] == END else (*stack[:-1], p + 1)
        if len(base) >= MAX_DEPTH:
            continue
        for a in alts[-2 - elems[p]]:
            todo.append(base if elems[a] == END else (*base, a))
    if len(out) > MAX_STACKS:
        return None, len(seen)
    return frozenset(out), len(seen)


def _after(elems: list[int], stack: tuple[int, ...]) -> tuple[int, ...]:
    """The stack past its top's byte."""
    p = stack[-1] + 1
    return stack[:-1] if elems[p] == END else (*stack[:-1], p)


def _columns(takes: np.ndarray) -> np.ndarray:
    """[256]: one key per byte, equal where the same stacks take it (``takes``: [stacks,
    256] bool), for grouping; up to 64 stacks an int (a 1-d unique is ~10x faster)."""
    keys = np.packbits(takes, axis=0, bitorder="little")  # [ceil(stacks / 8), 256]
    if len(keys) > 8:
        return np.unique(keys.T, axis=0, return_inverse=True)[1].ravel()
    padded = np.zeros((8, 256), np.uint8)
    padded[: len(keys)] = keys
    return padded.T.copy().view(np.uint64).ravel()


class GrammarStates:
    """One grammar's parser states as an engine meets them, numbered (0: dead), and their
    transitions by byte, each state's worked out at once (``fill``)."""

    def __init__(self, grammar: Grammar) -> None:
        self.grammar = grammar
        self.configs: list[frozenset] = [frozenset()]
        self.ids: dict[frozenset, int] = {frozenset(): DEAD}
        self.table = np.zeros((64, 256), np.int32)  # [capacity, 256] (unfilled rows: dead)
        self.filled = np.zeros(64, bool)
        self.filled[DEAD] = True

    @property
    def full(self) -> bool:
        return len(self.configs) > MAX_STATES

    def id(self, config: frozenset) -> int:
        sid = self.ids.get(config)
        if sid is None:
            sid = self.ids[config] = len(self.configs)
            self.configs.append(config)
            if sid == len(self.filled):
                self.table = np.concatenate([self.table, np.zeros_like(self.table)])
                self.filled = np.concatenate([self.filled, np.zeros_like(self.filled)])
        return sid

    def fill(self, sid: int, budget: int) -> int:
        """Works out the state's row within ``budget`` stacks met; the stacks met (past the
        budget the row stays unfilled, and reads as dead)."""
        stacks = [s for s in self.configs[sid] if s]
        grammar, used = self.grammar, 0
        row = np.zeros(256, np.int32)
        if stacks:
            takes = grammar.terminals[[grammar.elems[s[-1]] for s in stacks]]  # [stacks, 256]
            _, first, groups = np.unique(_columns(takes), return_index=True, return_inverse=True)
            targets = np.zeros(len(first), np.int32)
            for k, byte in enumerate(first):
                seeds = [_after(grammar.elems, stacks[i]) for i in np.flatnonzero(takes[:, byte])]
                if not seeds:
                    continue
                left = budget - used
                config, work = bounded_closure(grammar, seeds, min(MAX_CLOSURE, left))
                used += work
                if config is None and work > left:
                    return used  # (the pass's budget ran out: tried again in another)
                targets[k] = DEAD if config is None else self.id(config)
            row = targets[groups.ravel()]
        self.table[sid] = row
        self.filled[sid] = True
        return used

    def step(self, sid: int, byte: int) -> int:
        """The state after ``byte`` (one transition worked out where the row is not)."""
        if self.filled[sid]:
            return int(self.table[sid, byte])
        elems = self.grammar.elems
        terminals = self.grammar.terminals
        seeds = [_after(elems, s) for s in self.configs[sid] if s and terminals[elems[s[-1]], byte]]
        config = closure(self.grammar, seeds) if seeds else None
        return DEAD if config is None else self.id(config)


@dataclass
class GrammarCursor:
    """Where a request's output stands in its grammar; advanced by its new tokens."""

    grammar: Grammar
    config: frozenset | None = None  # the parser state (None: the grammar's start)
    consumed: int = 0  # output tokens read
    ended: bool = False  # an end token came where the text was a whole sentence
    broken: bool = False  # a token left the grammar (cannot be sampled under the mask)

    def __post_init__(self) -> None:
        if self.config is None:
            self.config = self.grammar.start

    @property
    def accepts(self) -> bool:
        return () in self.config

    def feed(self, states: GrammarStates, data: bytes) -> bool:
        """Advance by ``data``; False (the cursor then broken) if no sentence can follow."""
        sid = states.id(self.config)
        for byte in data:
            sid = states.step(sid, byte)
            if sid == DEAD:
                break
        self.config = states.configs[sid]
        self.broken = sid == DEAD
        return not self.broken
