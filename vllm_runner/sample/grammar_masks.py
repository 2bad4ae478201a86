"""``guided_grammar``: the output is a whole sentence of a context-free grammar (EBNF /
GBNF, ``grammar_parse.py``), then an end token.

Built as guided_regex's masks (``regex_masks.py``), over the recognizer's states as a DFA
made lazily (``grammar_states.py``): a parser state's mask is made once, by running every
vocabulary token's bytes from it at once (numpy, byte position by byte position; a state
met for the first time has its row of transitions worked out then), and kept on the logits'
device in a bounded LRU per engine, by (grammar text, parser state). Each row's cursor
advances by its new tokens on the host: the engine runs steps with a grammar row
synchronously (``EngineCore``), so the newest token is always there. End tokens (the model's
EOS ids, the request's stop_token_ids) are allowed exactly where the text so far is a whole
sentence, and where no token continues it (the output ends there).
"""

import functools
from collections import OrderedDict

import numpy as np
import torch

from vllm_runner.sample.grammar_compile import Grammar, compiled_grammar
from vllm_runner.sample.grammar_states import (
    DEAD,
    MAX_PASS_WORK,
    GrammarCursor,
    GrammarStates,
)
from vllm_runner.sample.rows import SamplingRow
from vllm_runner.sample.token_masks import (
    MASK_CACHE_BYTES,
    Mask,
    MaskCache,
    TokenBytes,
    apply_masks,
    replay,
)

MAX_GRAMMARS = 8  # grammars whose states an engine keeps (least recently used out)


def allowed_tokens(
    vocab: TokenBytes, states: GrammarStates, state: int, budget: int = MAX_PASS_WORK
) -> np.ndarray:
    """[vocab.width] bool: the tokens whose bytes, from parser state ``state``, leave a parse
    (end tokens by their bytes alone: ``mask_rows`` sets them). States met on the way have
    their rows worked out within ``budget`` stacks; past it, they read as dead."""
    rows = np.arange(len(vocab.ids))
    at = np.full(len(rows), state, np.int32)
    accepted = []
    j = 0
    while len(rows):
        ended = vocab.lengths[rows] == j
        if ended.any():
            accepted.append(rows[ended])
            rows, at = rows[~ended], at[~ended]
        unfilled = at[~states.filled[at]]
        for sid in np.unique(unfilled).tolist() if len(unfilled) and budget > 0 else ():
            budget -= states.fill(sid, budget)
            if budget <= 0:
                break
        at = states.table[at, vocab.flat[vocab.starts[rows] + j]]
        rows, at = rows[at != DEAD], at[at != DEAD]
        j += 1
    allowed = np.zeros(vocab.width, bool)
    if accepted:
        allowed[vocab.ids[np.concatenate(accepted)]] = True
    return allowed


class GrammarMasks:
    """One engine's vocabulary as bytes, its grammars' parser states (a bounded LRU by text)
    and their masks, by (grammar text, parser state) (a bounded LRU). NOTE: by the text:
    compiled again (the process's cache dropped it), a grammar numbers its positions alike,
    so its states' stacks are the same."""

    def __init__(self, vocab: TokenBytes, cache_bytes: int = MASK_CACHE_BYTES) -> None:
        self.vocab = vocab
        self.masks = MaskCache(vocab.width, cache_bytes)
        self.grammars: OrderedDict[str, GrammarStates] = OrderedDict()

    def states(self, grammar: Grammar) -> GrammarStates:
        """The grammar's states (new ones once it has MAX_STATES: the old ones' rows go)."""
        states = self.grammars.get(grammar.text)
        if states is None or states.full:
            states = self.grammars[grammar.text] = GrammarStates(grammar)
            if len(self.grammars) > MAX_GRAMMARS:
                self.grammars.popitem(last=False)
        self.grammars.move_to_end(grammar.text)
        return states

    def get(self, cursor: GrammarCursor) -> Mask:
        states = self.states(cursor.grammar)
        key = (cursor.grammar.text, cursor.config)
        return self.masks.fetch(
            key, lambda: allowed_tokens(self.vocab, states, states.id(cursor.config))
        )

    def advance(self, row: SamplingRow, ends: set[int]) -> GrammarCursor:
        """The row's cursor past its output so far (made at its first step, or again after
        a preemption gave the runner a new row: it replays the output)."""
        cursor = row.grammar_cursor
        if cursor is None:
            cursor = row.grammar_cursor = GrammarCursor(compiled_grammar(row.params.guided_grammar))
        states = self.states(cursor.grammar)
        feed = functools.partial(cursor.feed, states)
        replay(cursor, row.output_token_ids, self.vocab, ends, feed)
        return cursor


def apply_guided_grammar(
    logits: torch.Tensor,  # [rows, vocab] fp32, dense (edited in place)
    rows: list[SamplingRow],
    masks: GrammarMasks | None,
) -> None:
    """-inf on every token after which its row's text could no longer be a sentence of its
    grammar."""
    chosen = [i for i, row in enumerate(rows) if row.params.guided_grammar]
    apply_masks(logits, rows, chosen, masks, "guided_grammar")
