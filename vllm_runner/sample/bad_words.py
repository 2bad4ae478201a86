"""``bad_words``: texts a request never generates.

Each word becomes token sequences once, at admission: its tokens at the start of a text and
after a space (``" word"``), when those differ. In a step, a row may not sample the last
token of a sequence whose other tokens end its output so far (a one-token word: never).
Under async scheduling the output's newest token may still be on the device: a sequence
whose earlier tokens match on the host then bans its last token only where that pending
token is the one before it, decided on the device (no host sync).
"""

import torch

from vllm_runner.sample.rows import SamplingRow, host_values


def bad_word_token_ids(
    tokenizer, words: list[str], vocab_size: int | None = None
) -> list[tuple[int, ...]]:
    """Each word's token sequences (no special tokens): as written without its leading
    spaces, and after one space, when the tokenizer makes that another sequence. A word
    the tokenizer makes no tokens of has none (its " word" is a lone space, not the word);
    nor does a sequence with a token past the model's ``vocab_size`` (a tokenizer's added
    token the model has no logit for: never sampled, and its index would be another row's)."""
    sequences: dict[tuple[int, ...], None] = {}  # (ordered, no duplicates)
    for word in words:
        word = word.lstrip()
        for text in (word, " " + word):
            ids = tuple(tokenizer.encode(text, add_special_tokens=False))
            if not ids:  # no tokens: nothing to ban (" " + word would ban a lone space)
                break
            if vocab_size is None or max(ids) < vocab_size:
                sequences[ids] = None
    return list(sequences)


def ban_bad_words(
    logits: torch.Tensor,  # [rows, vocab] fp32, dense (edited in place)
    rows: list[SamplingRow],
    pending: torch.Tensor | None,  # [rows]: each row's newest output token on the device, or -1
) -> None:
    """-inf on every token that would complete one of its row's bad words."""
    which, tokens, needs = [], [], []
    for i, row in enumerate(rows):
        sequences = row.params.bad_words_token_ids
        if not sequences:
            continue
        output = row.output_token_ids  # on the host
        waiting = pending is not None and row.num_pending > 0
        for *before, last in sequences:
            need = -1  # banned whatever the pending token
            if waiting and before:
                *before, need = before
            known = len(before)
            if known <= len(output) and output[len(output) - known :] == before:
                which.append(i)
                tokens.append(last)
                needs.append(need)
    if not which:
        return
    vocab = logits.shape[1]
    staged = host_values([which, tokens, needs], torch.long, logits.device)
    hit = staged[2] < 0
    if pending is not None:
        hit |= pending[staged[0]] == staged[2]
    # amin: -inf bans the token, +inf leaves its logit (a token listed twice: banned if any)
    values = torch.where(hit, float("-inf"), float("inf"))
    logits.view(-1).scatter_reduce_(0, staged[0] * vocab + staged[1], values, "amin")
