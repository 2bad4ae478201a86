"""guided_grammar's compiler: the parsed rules (``grammar_parse.py``) as flat alternatives of
byte sets and rule references over UTF-8 bytes, what the recognizer (``grammar_states.py``)
walks.

A class of code points becomes byte sets in sequence (``regex_nfa.utf8_sequences``); a
group, a class of several byte lengths and a repeat become rules of their own (``x*`` is
``s ::= x s | ""``, ``x{2,4}`` is ``x x o2`` with ``o2 ::= x o1 | ""``, ``o1 ::= x | ""``).
Alternatives that can never end (a rule of no finite text) are dropped, so every parser
state can reach a whole sentence. A rule that starts with itself (``expr ::= expr "+" term
| term``) is rewritten to the same language without it (``expr ::= term expr'``, ``expr'
::= "+" term expr' | ""``); left recursion through other rules, or after a part that may be
empty, is refused by name: the recognizer's stacks would grow without reading a byte.
"""

import functools
from dataclasses import dataclass

import numpy as np

from vllm_runner.sample.grammar_parse import ParsedGrammar, Ref, parse_grammar, where
from vllm_runner.sample.grammar_states import END, MAX_STACKS, closure
from vllm_runner.sample.regex_nfa import utf8_sequences
from vllm_runner.sample.regex_parse import Chars, Concat, Either

MAX_ELEMENTS = 200_000  # symbols of the compiled rules (repeats written out count)


@dataclass(eq=False)
class Grammar:
    """A compiled grammar: ``elems`` lays every rule's alternatives out one after another,
    each ending in END; a position is an index in it."""

    text: str
    elems: list[int]  # per position: a terminal id (>= 0), END, or -2 - a rule
    alts: list[tuple[int, ...]]  # per rule: its alternatives' first positions
    owners: list[str]  # per rule: the rule of the text it is (part of)
    terminals: np.ndarray  # [terminals, 256] bool: the bytes each terminal takes
    root: int
    start: frozenset = frozenset()  # the parser state before any byte


@functools.lru_cache(maxsize=64)
def compiled_grammar(text: str) -> Grammar:
    """``compile_grammar(text)``, once per text in the process (validation, the input
    checks and every engine of the process ask for it)."""
    return compile_grammar(text)


def compile_grammar(text: str) -> Grammar:
    """ValueError naming the line, column or rule at fault, or the limit passed."""
    parsed = parse_grammar(text)
    builder = _Builder(parsed)
    bodies = builder.build()
    owners = builder.owners
    _drop_direct_left_recursion(bodies, owners, len(parsed.rules))
    root = list(parsed.rules).index("root")
    productive = _derives(bodies, terminals=True)
    if not productive[root]:
        raise ValueError("guided_grammar: rule 'root' derives no text that ends (each of its "
                         "alternatives recurses forever)")  # fmt: skip
    for alts in bodies:
        alts[:] = [alt for alt in alts if all(s > 0 or productive[-1 - s] for s in alt)]
    _refuse_left_recursion(bodies, owners)
    grammar = _flat(text, bodies, owners, root)
    seeds = [() if grammar.elems[a] == END else (a,) for a in grammar.alts[root]]
    grammar.start = closure(grammar, seeds)
    if grammar.start is None:
        raise ValueError(f"guided_grammar: its start is more than {MAX_STACKS} ways to parse "
                         "(the limit): the grammar is too ambiguous")  # fmt: skip
    return grammar


class _Builder:
    """Each rule's alternatives as lists of symbols: a byte set's mask (an int > 0, bit b
    for byte b) or a rule's -1 - id (the text's rules first, in their order)."""

    def __init__(self, parsed: ParsedGrammar) -> None:
        self.parsed = parsed
        self.ids = {name: i for i, name in enumerate(parsed.rules)}
        self.bodies: list[list[list[int]]] = [[] for _ in parsed.rules]
        self.owners = list(parsed.rules)
        self.owner = ""
        self.size = 0
        self.classes: dict[tuple, list[int]] = {}

    def build(self) -> list[list[list[int]]]:
        for name, body in self.parsed.rules.items():
            self.owner = name
            self.bodies[self.ids[name]] = self.alternatives(body)
            self.grow(sum(len(alt) + 1 for alt in self.bodies[self.ids[name]]))
        return self.bodies

    def grow(self, n: int) -> None:
        self.size += n
        if self.size > MAX_ELEMENTS:
            raise ValueError(
                f"guided_grammar: more than {MAX_ELEMENTS} symbols once its repeats are "
                f"written out (the limit), in rule {self.owner!r}"
            )

    def rule(self, alts: list[list[int]]) -> int:
        """A new rule (part of the current one) of ``alts``; its symbol."""
        self.bodies.append(alts)
        self.owners.append(self.owner)
        self.grow(sum(len(alt) + 1 for alt in alts))
        return -len(self.bodies)

    def alternatives(self, node) -> list[list[int]]:
        if isinstance(node, Either):
            return [alt for option in node.options for alt in self.alternatives(option)]
        return [self.sequence(node)]

    def sequence(self, node) -> list[int]:
        if isinstance(node, Concat):
            return [s for part in node.parts for s in self.sequence(part)]
        if isinstance(node, Chars):
            return self.chars(node.ranges)
        if isinstance(node, Either):
            return [self.rule(self.alternatives(node))]
        if isinstance(node, Ref):
            if node.name not in self.ids:
                raise ValueError(
                    f"guided_grammar: {where(self.parsed.text, node.at)}: rule {node.name!r} "
                    f"is not defined (rules: {', '.join(list(self.ids)[:20])})"
                )
            return [-1 - self.ids[node.name]]
        return self.repeat(node)

    def chars(self, ranges: tuple) -> list[int]:
        seqs = utf8_sequences(ranges)
        if not seqs:
            raise ValueError(
                f"guided_grammar: rule {self.owner!r} has a character or class of surrogates "
                "only (U+D800-U+DFFF): no UTF-8 text holds them"
            )
        if all(len(seq) == 1 for seq in seqs):
            return [sum(_mask(lo, hi) for ((lo, hi),) in seqs)]  # (UTF-8 ranges are disjoint)
        if len(seqs) == 1:
            return [_mask(lo, hi) for lo, hi in seqs[0]]
        if ranges not in self.classes:
            ones = sum(_mask(lo, hi) for ((lo, hi),) in (s for s in seqs if len(s) == 1))
            alts = [[_mask(lo, hi) for lo, hi in seq] for seq in seqs if len(seq) > 1]
            self.classes[ranges] = [self.rule(alts + ([[ones]] if ones else []))]
        return self.classes[ranges]

    def repeat(self, node) -> list[int]:
        body = self.sequence(node.node)
        if len(body) != 1:
            body = [self.rule([body])]
        out = body * node.low
        self.grow(len(out))
        if node.high is None:  # s ::= body s | ""
            star = self.rule([])
            self.bodies[-1 - star] = [body + [star], []]
            self.grow(3)
            out.append(star)
        elif node.high > node.low:  # o_k ::= body o_(k-1) | "" (o_0: nothing)
            tail: list[int] = []
            for _ in range(node.high - node.low):
                tail = [self.rule([body + tail, []])]
            out += tail
        return out


def _mask(lo: int, hi: int) -> int:
    return (1 << (hi + 1)) - (1 << lo)


def _drop_direct_left_recursion(bodies: list, owners: list[str], num_named: int) -> None:
    """``a ::= a x | y`` as ``a ::= y a'`` and ``a' ::= x a' | ""`` (the text's rules only:
    a part's rule never starts with itself); ``a ::= a`` adds nothing, dropped."""
    for a in range(num_named):
        me = -1 - a
        again = [alt[1:] for alt in bodies[a] if alt and alt[0] == me]
        if not again:
            continue
        tail = -1 - len(bodies)
        bodies.append([rest + [tail] for rest in again if rest] + [[]])
        owners.append(owners[a])
        bodies[a] = [alt + [tail] for alt in bodies[a] if not (alt and alt[0] == me)]


def _derives(bodies: list, terminals: bool) -> list[bool]:
    """Per rule: whether it derives a finite text (``terminals``), or the empty text (not);
    a worklist, linear in the symbols."""
    waiting: dict[tuple[int, int], int] = {}
    users: list[list[tuple[int, int]]] = [[] for _ in bodies]
    ready = []
    for r, alts in enumerate(bodies):
        for k, alt in enumerate(alts):
            if not terminals and any(s > 0 for s in alt):
                continue
            refs = [-1 - s for s in alt if s < 0]
            waiting[r, k] = len(refs)
            for q in refs:
                users[q].append((r, k))
            if not refs:
                ready.append(r)
    done = [False] * len(bodies)
    while ready:
        r = ready.pop()
        if done[r]:
            continue
        done[r] = True
        for key in users[r]:
            waiting[key] -= 1
            if waiting[key] == 0:
                ready.append(key[0])
    return done


def _refuse_left_recursion(bodies: list, owners: list[str]) -> None:
    """ValueError if a rule can start with itself with a symbol left after (the stack would
    grow without reading a byte); a recursion in a tail (``s ::= x s`` with x empty) keeps
    the stack as it is, and the recognizer's closure meets it again: taken."""
    nullable = _derives(bodies, terminals=False)
    edges: list[list[int]] = [[] for _ in bodies]
    growing = []
    for a, alts in enumerate(bodies):
        for alt in alts:
            for i, s in enumerate(alt):
                if s > 0:
                    break
                edges[a].append(-1 - s)
                if i + 1 < len(alt):
                    growing.append((a, -1 - s))
                if not nullable[-1 - s]:
                    break
    component = _components(edges)
    for a, b in growing:
        if component[a] == component[b]:
            raise ValueError(
                f"guided_grammar: rule {owners[a]!r} is left-recursive (through "
                f"{owners[b]!r}, it can start with itself before more text): not taken; write "
                "the repetition with '*' or '+', e.g. list ::= item (\",\" item)*"
            )


def _components(edges: list[list[int]]) -> list[int]:
    """Strongly connected components (Kosaraju's, iterative): each node's component."""
    n, order, seen = len(edges), [], [False] * len(edges)
    for s in range(n):
        if seen[s]:
            continue
        seen[s] = True
        stack = [(s, iter(edges[s]))]
        while stack:
            v, out = stack[-1]
            for w in out:
                if not seen[w]:
                    seen[w] = True
                    stack.append((w, iter(edges[w])))
                    break
            else:
                stack.pop()
                order.append(v)
    back: list[list[int]] = [[] for _ in range(n)]
    for v in range(n):
        for w in edges[v]:
            back[w].append(v)
    component = [-1] * n
    for c, s in enumerate(reversed(order)):
        if component[s] >= 0:
            continue
        component[s], todo = c, [s]
        while todo:
            for w in back[todo.pop()]:
                if component[w] < 0:
                    component[w] = c
                    todo.append(w)
    return component


def _flat(text: str, bodies: list, owners: list[str], root: int) -> Grammar:
    terminal_ids: dict[int, int] = {}
    elems: list[int] = []
    alts = []
    for rule in bodies:
        starts = []
        for alt in rule:
            starts.append(len(elems))
            elems += [terminal_ids.setdefault(s, len(terminal_ids)) if s > 0 else s - 1
                      for s in alt]  # fmt: skip
            elems.append(END)
        alts.append(tuple(starts))
    masks = [m.to_bytes(32, "little") for m in terminal_ids]
    bits = np.unpackbits(np.frombuffer(b"".join(masks), np.uint8), bitorder="little")
    return Grammar(text, elems, alts, owners, bits.reshape(-1, 256).astype(bool), root)
