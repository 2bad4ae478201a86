"""Prompt logprobs (vLLM's ``prompt_logprobs``): for each prompt token after the first, its
logprob given its prefix and the top-k tokens' at that position, and its rank there."""

import torch

from vllm_runner.engine.outputs import ModelRunnerOutput
from vllm_runner.worker.input_batch import CachedRequestState, StepInputs

PROMPT_LOGPROB_ROWS = 512  # prompt positions whose logits are materialised at once


def prompt_logprobs(
    model: torch.nn.Module,
    states: dict[str, CachedRequestState],
    inputs: StepInputs,
    hidden: torch.Tensor,  # [num_tokens, hidden]: every token of the step
    result: ModelRunnerOutput,
) -> None:
    """Appends this step's positions to each asking request's ``prompt_logprobs`` (one
    ``{token id: logprob}`` per position) and ``prompt_ranks`` (the prompt token's rank there)
    and, once its prompt is done, hands both lists to ``result``."""
    for i, request_id in enumerate(inputs.request_ids):
        state = states[request_id]
        top = state.params.prompt_logprobs
        if top is None:
            continue
        lo, hi = int(inputs.query_start_loc[i]), int(inputs.query_start_loc[i + 1])
        start = int(inputs.seq_lens[i]) - (hi - lo)
        # position p predicts token p + 1; only prompt tokens count
        end = min(start + (hi - lo), state.num_prompt_tokens - 1)
        for a in range(start, end, PROMPT_LOGPROB_ROWS):  # bounds the [rows, vocab] logits
            b = min(a + PROMPT_LOGPROB_ROWS, end)
            rows = hidden[lo + a - start : lo + b - start]
            logprobs = model.compute_logits(rows).float().log_softmax(dim=-1)
            targets = state.token_ids[a + 1 : b + 1]
            own = logprobs.gather(1, torch.tensor(targets, device=hidden.device)[:, None])
            # as vLLM's: how many tokens are at least as likely as the prompt's own (it
            # included): 1 is the most likely
            state.prompt_ranks.extend((logprobs >= own).sum(dim=-1).tolist())
            best = logprobs.topk(top, dim=-1) if top else None
            for r, (token, lp) in enumerate(zip(targets, own[:, 0].tolist(), strict=True)):
                entry = {token: lp}
                if best is not None:
                    ids, values = best.indices[r].tolist(), best.values[r].tolist()
                    entry.update(zip(ids, values, strict=True))
                state.prompt_logprobs.append(entry)
        if request_id in inputs.sampling_ids and state.num_prompt_tokens == len(state.token_ids):
            result.prompt_logprobs[request_id] = [None, *state.prompt_logprobs]
            result.prompt_ranks[request_id] = [None, *state.prompt_ranks]
