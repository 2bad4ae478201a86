"""``guided_choice``: the output is exactly one of a request's choices, then an end token.

Each choice becomes its tokens once, at admission. In a step, a row may sample only the next
token of a choice whose tokens so far are its whole output; where its output is a whole
choice, also an end token (the model's EOS ids and the request's stop_token_ids), which
stops it. Under async scheduling the output's newest token may still be on the device: the
row's allowed tokens then depend on it, and the choice's token that it must be for each is
compared on the device (no host sync). A row that no choice continues (a step launched
after its end token, whose token is dropped) may sample anything, never a row of -inf.
"""

import torch

from vllm_runner.sample.rows import SamplingRow, host_values


def choice_token_ids(tokenizer, choices: list[str]) -> list[tuple[int, ...]]:
    """Each choice's tokens as the model writes it (no special tokens), duplicates once.
    ValueError for a choice the tokenizer makes no tokens of."""
    sequences: dict[tuple[int, ...], None] = {}  # (ordered, no duplicates)
    for choice in choices:
        ids = tuple(tokenizer.encode(choice, add_special_tokens=False))
        if not ids:
            raise ValueError(f"guided_choice entry {choice!r} makes no tokens")
        sequences[ids] = None
    return list(sequences)


def allowed_next(
    sequences: list[tuple[int, ...]], output: list[int], waiting: bool, ends: list[int]
) -> list[tuple[int, int]]:
    """(token, need) pairs: ``token`` may come next if the pending token is ``need`` (-1:
    whatever it is, or none pending). ``output``: the tokens known on the host; ``waiting``:
    one more is pending on the device."""
    known = len(output)
    pairs: dict[tuple[int, int], None] = {}
    for seq in sequences:
        if len(seq) < known + waiting or list(seq[:known]) != output:
            continue
        need = seq[known] if waiting else -1
        rest = seq[known + waiting :]
        for token in rest[:1] or ends:
            pairs[(token, need)] = None
    return list(pairs)


def apply_guided_choice(
    logits: torch.Tensor,  # [rows, vocab] fp32, dense (edited in place)
    rows: list[SamplingRow],
    pending: torch.Tensor | None,  # [rows]: each row's newest output token on the device, or -1
) -> None:
    """-inf on every token that would leave its row's choices."""
    guided = [i for i, row in enumerate(rows) if row.params.guided_choice_token_ids]
    if not guided:
        return
    slots, tokens, needs = [], [], []
    for slot, i in enumerate(guided):
        row, params = rows[i], rows[i].params
        ends = sorted(params.all_stop_token_ids | set(params.stop_token_ids))
        waiting = pending is not None and row.num_pending > 0
        for token, need in allowed_next(
            params.guided_choice_token_ids, row.output_token_ids, waiting, ends
        ):
            slots.append(slot)
            tokens.append(token)
            needs.append(need)
    vocab = logits.shape[1]
    keep = torch.zeros(len(guided), vocab, dtype=torch.float32, device=logits.device)
    index = host_values(guided, torch.long, logits.device)
    if slots:
        staged = host_values([slots, tokens, needs], torch.long, logits.device)
        hit = staged[2] < 0
        if pending is not None:
            hit |= pending[index[staged[0]]] == staged[2]
        keep.view(-1).scatter_reduce_(0, staged[0] * vocab + staged[1], hit.float(), "amax")
    keep = torch.maximum(keep, (keep.amax(dim=1, keepdim=True) == 0).float())  # none: any
    logits[index] = logits[index].masked_fill(keep == 0, float("-inf"))
