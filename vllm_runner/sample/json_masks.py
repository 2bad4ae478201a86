"""``json_object``: the output is one JSON object (``json_grammar.py``), then an end token.

A step's allowed tokens depend on the row's lexical state, its whitespace run and only the
innermost stack entries: a token closes at most ``JsonVocab.depth - 1`` brackets, so the key
holds ``depth`` entries (the one under the closed ones decides what a comma opens) and
whether they are the whole stack (then a token may close the object). A key's mask is made
once, by running every vocabulary token from that state at once (numpy, byte position by
byte position), and kept on the logits' device in a bounded LRU per engine. Each row's
cursor advances by its new tokens on the host: the engine runs steps with a JSON row
synchronously (``EngineCore``), so the newest token is always there. End tokens (the model's
EOS ids, the request's stop_token_ids) are allowed once the object is whole, and only then.
"""

import numpy as np
import torch

from vllm_runner.sample import json_grammar as g
from vllm_runner.sample.rows import SamplingRow
from vllm_runner.sample.token_masks import (
    MASK_CACHE_BYTES,
    Mask,
    MaskCache,
    TokenBytes,
    apply_masks,
    replay,
)

# A token with more brackets than this is never sampled in JSON mode (shorter tokens write
# the same bytes): it keeps the keys short and the simulated stack within an int64.
MAX_TOKEN_BRACKETS = 16


class JsonVocab(TokenBytes):
    """A vocabulary's tokens as bytes for JSON mode's pass (built once): the tokens of few
    enough brackets, how many a token closes at most, and which are plain string bytes."""

    def __init__(self, pieces: list[bytes | None]) -> None:
        """``pieces``: each logit's token bytes (None: not JSON text, e.g. a special token)."""
        super().__init__(pieces, _few_brackets)
        closers = [pieces[i].count(b"}") + pieces[i].count(b"]") for i in self.ids]
        self.depth = max(closers, default=0) + 1
        # plain string bytes: such a token keeps an in-string state whatever the stack
        plain = np.array([_plain_string(pieces[i]) for i in self.ids], bool)
        self.string_safe = np.zeros(self.width, bool)
        self.string_safe[self.ids[plain]] = True
        self.unsafe_rows = np.flatnonzero(~plain)


def _few_brackets(data: bytes) -> bool:
    return (
        data.count(b"}") + data.count(b"]") <= MAX_TOKEN_BRACKETS
        and data.count(b"{") + data.count(b"[") <= MAX_TOKEN_BRACKETS
    )


def _plain_string(data: bytes) -> bool:
    return b'"' not in data and b"\\" not in data and min(data) >= 0x20


def allowed_tokens(vocab: JsonVocab, key: tuple[int, int, tuple[int, ...], bool]) -> np.ndarray:
    """[vocab.width] bool: which tokens may come next from the state ``key`` (JsonCursor.key
    with vocab.depth)."""
    state, run, entries, whole = key
    allowed = np.zeros(vocab.width, bool)
    rows = np.arange(len(vocab.ids))
    if state in g.IN_STRING:
        allowed |= vocab.string_safe
        rows = vocab.unsafe_rows
    bits = sum(entry << i for i, entry in enumerate(reversed(entries)))  # innermost: bit 0
    allowed[vocab.ids[_run(vocab, rows, state, run, bits, len(entries), whole)]] = True
    return allowed


def _run(
    vocab: JsonVocab, rows: np.ndarray, state: int, run: int, bits: int, size: int, whole: bool
) -> np.ndarray:
    """The rows (of vocab.ids) whose bytes are valid from the state, all at once: the
    stack as bits (innermost: bit 0) and the count of entries known."""
    n = len(rows)
    st = np.full(n, state, np.int64)
    rn = np.full(n, run, np.int64)
    bt = np.full(n, bits, np.int64)
    sz = np.full(n, size, np.int64)
    accepted = []
    j = 0
    while len(rows):
        ended = vocab.lengths[rows] == j
        if ended.any():
            accepted.append(rows[ended])
            left = ~ended
            rows, st, rn, bt, sz = rows[left], st[left], rn[left], bt[left], sz[left]
        b = vocab.flat[vocab.starts[rows] + j]
        to, act = g.NEXT[st, b].astype(np.int64), g.ACTION[st, b]
        rn = np.where(act == g.WS, rn + 1, 0)
        push = (act == g.PUSH_OBJ) | (act == g.PUSH_ARR)
        pop = (act == g.POP_OBJ) | (act == g.POP_ARR)
        comma = act == g.COMMA
        top = bt & 1
        # NOTE: sz > 0 for a pop or comma: with the key's depth, a token never reads past it
        ok = (to >= 0) & (rn <= g.MAX_WHITESPACE) & (~(pop | comma) | (sz > 0))
        ok &= ~pop | (top == (act == g.POP_ARR))
        to = np.where(comma & (top == g.OBJ), g.OBJ_NEXT, to)
        bt = np.where(push, (bt << 1) | (act == g.PUSH_ARR), np.where(pop, bt >> 1, bt))
        sz = sz + push - pop
        to = np.where(pop & (sz == 0) & whole, g.DONE, to)
        rows, st, rn, bt, sz = rows[ok], to[ok], rn[ok], bt[ok], sz[ok]
        j += 1
    return np.concatenate(accepted) if accepted else np.zeros(0, np.int64)


class JsonMasks:
    """One engine's JSON vocabulary and its masks, by key (a bounded LRU)."""

    def __init__(self, vocab: JsonVocab, cache_bytes: int = MASK_CACHE_BYTES) -> None:
        self.vocab = vocab
        self.masks = MaskCache(vocab.width, cache_bytes)

    def get(self, cursor: g.JsonCursor) -> Mask:
        key = cursor.key(self.vocab.depth)
        return self.masks.fetch(key, lambda: allowed_tokens(self.vocab, key))

    def advance(self, row: SamplingRow, ends: set[int]) -> g.JsonCursor:
        """The row's cursor past its output so far (made at its first step, or again after
        a preemption gave the runner a new row: it replays the output)."""
        cursor = row.json_cursor
        if cursor is None:
            cursor = row.json_cursor = g.JsonCursor()
        replay(cursor, row.output_token_ids, self.vocab, ends, cursor.feed)
        return cursor


def apply_json_object(
    logits: torch.Tensor,  # [rows, vocab] fp32, dense (edited in place)
    rows: list[SamplingRow],
    masks: JsonMasks | None,
) -> None:
    """-inf on every token that would leave its row's JSON object."""
    chosen = [i for i, row in enumerate(rows) if row.params.json_object]
    apply_masks(logits, rows, chosen, masks, "json_object")
