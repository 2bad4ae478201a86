"""What JSON mode's, guided_regex's and guided_grammar's masks share (``json_masks.py``,
``regex_masks.py``, ``grammar_masks.py``): the vocabulary's tokens as bytes, laid out for a
pass over every token at once; masks by key in a bounded LRU with their copy on the logits'
device; a cursor's replay of a row's new tokens; and the step that puts the masked rows'
masks into the logits, with the end tokens' rule. A cursor (JsonCursor, RegexCursor,
GrammarCursor) has ``consumed`` (output tokens read), ``ended``, ``broken`` and ``accepts``
(whether the output may end where it is)."""

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vllm_runner.sample.rows import SamplingRow, host_values
from vllm_runner.sampling_params import SamplingParams

MASK_CACHE_BYTES = 32 << 20  # per copy (host and device): ~680 masks of a 49k vocabulary


class TokenBytes:
    """A vocabulary's tokens as bytes, laid out for the vectorized pass (built once)."""

    def __init__(self, pieces: list[bytes | None], usable: Callable[[bytes], bool] = bool) -> None:
        """``pieces``: each logit's token bytes (None: no text, e.g. a special token);
        ``usable``: which non-empty ones the pass runs (the others are never allowed)."""
        self.pieces = pieces
        self.width = len(pieces)
        ids = [i for i, p in enumerate(pieces) if p and usable(p)]
        self.ids = np.array(ids, np.int64)  # the tokens the pass runs
        self.lengths = np.array([len(pieces[i]) for i in ids], np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        self.flat = np.frombuffer(b"".join(pieces[i] for i in ids), np.uint8)


@dataclass
class Mask:
    host: np.ndarray  # [width] bool
    count: int  # allowed tokens
    device: torch.Tensor | None = None  # [width] bool on the logits' device, once used


class MaskCache(OrderedDict):
    """Masks by key, least recently used first out past ``cache_bytes`` (16 at least)."""

    def __init__(self, width: int, cache_bytes: int = MASK_CACHE_BYTES) -> None:
        super().__init__()
        self.max_keys = max(16, cache_bytes // max(width, 1))

    def fetch(self, key: Hashable, make: Callable[[], np.ndarray]) -> Mask:
        mask = self.get(key)
        if mask is None:
            host = make()
            mask = self[key] = Mask(host, int(host.sum()))
            if len(self) > self.max_keys:
                self.popitem(last=False)
        else:
            self.move_to_end(key)
        return mask


def end_ids(params: SamplingParams, width: int) -> set[int]:
    """The row's end tokens: the model's EOS ids and its stop_token_ids. NOTE: an EOS id past
    the logits (a tokenizer's beyond the model's vocabulary) can never be sampled: left out,
    not indexed."""
    return {t for t in params.all_stop_token_ids | set(params.stop_token_ids) if t < width}


def replay(
    cursor: Any,  # a JsonCursor / RegexCursor / GrammarCursor (module docstring)
    output: list[int],  # the row's output token ids
    vocab: TokenBytes,
    ends: set[int],  # the row's end tokens
    feed: Callable[[bytes], bool],  # the cursor advanced by a token's bytes (False: broken)
) -> None:
    """The cursor past the output tokens it has not read (all of them at a row's first step,
    or after a preemption gave the runner a new row). An end token ends it where the output
    is whole and breaks it elsewhere (no token could go on there); a token of no bytes, or
    whose bytes leave the language, breaks it."""
    for token in output[cursor.consumed :]:
        if cursor.ended or cursor.broken:
            break
        if token in ends:
            cursor.ended = cursor.accepts
            cursor.broken = not cursor.ended
            break
        piece = vocab.pieces[token] if token < vocab.width else None
        if piece is None or not feed(piece):
            cursor.broken = True
    cursor.consumed = len(output)


def apply_masks(
    logits: torch.Tensor,  # [rows, vocab] fp32, dense (edited in place)
    rows: list[SamplingRow],
    chosen: list[int],  # the rows this kind of mask guides
    masks: Any,  # the engine's Json / Regex / GrammarMasks: advance(row, ends), get(cursor)
    kind: str,  # the setting, for errors ("json_object", "guided_regex", "guided_grammar")
) -> None:
    """Each chosen row's cursor advanced past its new tokens on the host, then its mask
    applied (``mask_rows``). The engine runs steps with such a row synchronously: a token
    still on the device is an error here."""
    if not chosen:
        return
    if masks is None:
        raise RuntimeError(f"{kind}: the engine made no masks' vocabulary for this sampler")
    width = masks.vocab.width
    row_masks, row_ends, wholes = [], [], []
    for i in chosen:
        row = rows[i]
        if row.num_pending:
            raise RuntimeError(f"{kind}: {row.num_pending} tokens still on the device")
        ends = end_ids(row.params, width)
        cursor = masks.advance(row, ends)
        over = cursor.ended or cursor.broken
        row_masks.append(None if over else masks.get(cursor))
        row_ends.append(ends)
        wholes.append(cursor.accepts)
    mask_rows(logits, chosen, row_masks, row_ends, wholes)


def mask_rows(
    logits: torch.Tensor,  # [rows, vocab] fp32, dense (edited in place)
    chosen: list[int],  # the masked rows
    masks: list[Mask | None],  # per chosen row (None: its output is over, left untouched)
    ends: list[set[int]],  # per chosen row: its end tokens
    whole: list[bool],  # per chosen row: whether its output may end here
) -> None:
    """-inf on each chosen row's tokens outside its mask. Its end tokens are allowed where
    its output is whole, and where no other token is (the output ends: nothing can continue
    it with this vocabulary); never a row of -inf."""
    keeps, fix_rows, fix_tokens, fix_values = [], [], [], []
    for slot, (mask, row_ends, done) in enumerate(zip(masks, ends, whole, strict=True)):
        if mask is None:  # (no step samples for it)
            keeps.append(torch.ones(logits.shape[1], dtype=torch.bool, device=logits.device))
            continue
        if mask.device is None:
            mask.device = torch.as_tensor(mask.host).to(logits.device)
        keeps.append(mask.device)
        left = mask.count - sum(bool(mask.host[t]) for t in row_ends)
        for token in sorted(row_ends):
            fix_rows.append(slot)
            fix_tokens.append(token)
            fix_values.append(done or left == 0)
    keep = torch.stack(keeps)  # [len(chosen), vocab] bool (a new tensor)
    if fix_rows:
        staged = host_values([fix_rows, fix_tokens], torch.long, logits.device)
        values = host_values(fix_values, torch.bool, logits.device)
        keep.index_put_((staged[0], staged[1]), values)
    index = host_values(chosen, torch.long, logits.device)
    logits[index] = logits[index].masked_fill(~keep, float("-inf"))
