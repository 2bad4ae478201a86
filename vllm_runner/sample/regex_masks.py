"""``guided_regex``: the output is text that fully matches a regular expression (the DFA over
UTF-8 bytes of ``regex_dfa.py``), then an end token.

Built as JSON mode (``json_masks.py``): a DFA state's mask is made once, by running every
vocabulary token's bytes from it at once (numpy, byte position by byte position, a token
allowed if it never reaches the dead state), and kept on the logits' device in a bounded
LRU per engine, by (pattern, state, and a counted repeat's count as far as a token can tell
it apart). Each row's cursor (its DFA state and counts after its output so far) advances by
its new tokens on the host: the engine runs steps with a regex row
synchronously (``EngineCore``), so the newest token is always there. End tokens (the model's
EOS ids, the request's stop_token_ids) are allowed exactly where the text so far matches;
where it matches and no token continues it, only they are. Where no token continues a text
that does not match yet (a vocabulary that cannot write the next byte), they are allowed
too: the output ends, short of a match, rather than a step with nothing to sample.
"""

import numpy as np
import torch

from vllm_runner.sample.regex_counters import Counters
from vllm_runner.sample.regex_dfa import DEAD, RegexCursor, RegexDfa, compiled
from vllm_runner.sample.rows import SamplingRow
from vllm_runner.sample.token_masks import (
    MASK_CACHE_BYTES,
    Mask,
    MaskCache,
    TokenBytes,
    apply_masks,
    replay,
)


def allowed_tokens(
    vocab: TokenBytes, dfa: RegexDfa, state: int, counts: tuple[int, ...] = ()
) -> np.ndarray:
    """[vocab.width] bool: the tokens whose bytes, from ``state`` (and its ``counts``), never
    reach the dead state (end tokens by their bytes alone: ``mask_rows`` sets them)."""
    rows = np.arange(len(vocab.ids))
    at = np.full(len(rows), state, np.int32)
    counters = dfa.counters
    held = None if counters is None else counters.held(len(rows), counts)
    accepted = []
    j = 0
    while len(rows):
        ended = vocab.lengths[rows] == j
        if ended.any():
            accepted.append(rows[ended])
            rows, at, held = _kept(~ended, rows, at, held)
        at = dfa.table[at, vocab.flat[vocab.starts[rows] + j]]
        if held is not None:
            at, held = _counted(counters, at, held)
        rows, at, held = _kept(at != DEAD, rows, at, held)
        j += 1
    allowed = np.zeros(vocab.width, bool)
    if accepted:
        allowed[vocab.ids[np.concatenate(accepted)]] = True
    return allowed


def _kept(
    keep: np.ndarray, rows: np.ndarray, at: np.ndarray, held: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The rows, their states and counts where ``keep``."""
    if held is None:
        return rows[keep], at[keep], None
    index = np.flatnonzero(keep)  # (a boolean index of held's 2-d rows is ~10x slower)
    return rows[index], at[index], held.take(index, axis=0)


def _counted(counters: Counters, at: np.ndarray, held: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows whose table entry is a counter step, past it (the others kept as they are:
    a JSON string's every character ends an iteration of its ``maxLength`` repeat, so most
    rows step)."""
    step = at < 0
    if not step.any():
        return at, held
    after, held = counters.step(np.where(step, -1 - at, counters.keep), held)
    return np.where(step, after, at), held


class RegexMasks:
    """One engine's vocabulary as bytes and its regex masks, by (pattern, DFA state, the
    counts' horizon key) (a bounded LRU). NOTE: by the pattern's text: compiled again (the
    process's cache dropped it), a pattern's DFA numbers its states alike. Counts are keyed
    as far as a token can tell them apart (``Counters.horizon_key``, the horizon the longest
    token's bytes): a long counted repeat's masks are made near its bounds, not per count."""

    def __init__(self, vocab: TokenBytes, cache_bytes: int = MASK_CACHE_BYTES) -> None:
        self.vocab = vocab
        self.masks = MaskCache(vocab.width, cache_bytes)
        self.horizon = int(vocab.lengths.max(initial=0))

    def get(self, cursor: RegexCursor) -> Mask:
        dfa, state, counts = cursor.dfa, cursor.state, cursor.counts
        key = (dfa.pattern, state)
        if dfa.counters is not None:
            key += dfa.counters.horizon_key(state, counts, self.horizon)
        return self.masks.fetch(key, lambda: allowed_tokens(self.vocab, dfa, state, counts))

    def advance(self, row: SamplingRow, ends: set[int]) -> RegexCursor:
        """The row's cursor past its output so far (made at its first step, or again after
        a preemption gave the runner a new row: it replays the output)."""
        cursor = row.regex_cursor
        if cursor is None:
            cursor = row.regex_cursor = RegexCursor(compiled(row.params.guided_pattern))
        replay(cursor, row.output_token_ids, self.vocab, ends, cursor.feed)
        return cursor


def apply_guided_regex(
    logits: torch.Tensor,  # [rows, vocab] fp32, dense (edited in place)
    rows: list[SamplingRow],
    masks: RegexMasks | None,
) -> None:
    """-inf on every token after which its row's text could no longer match its pattern."""
    chosen = [i for i, row in enumerate(rows) if row.params.guided_pattern]
    apply_masks(logits, rows, chosen, masks, "guided_regex")
