"""prompt_logprobs(): which positions a step scores and when the list is handed over."""

import math

import pytest
import torch

from tests.unit.test_input_batch import step
from vllm_runner.engine.outputs import ModelRunnerOutput, NewRequestData
from vllm_runner.sampling_params import SamplingParams
from vllm_runner.worker.input_batch import InputBatch
from vllm_runner.worker.prompt_logprobs import prompt_logprobs


class _Identity(torch.nn.Module):
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden  # the hidden rows are the logits


def _run(tokens: list[int], num_prompt: int) -> ModelRunnerOutput:
    params = SamplingParams(max_tokens=4, prompt_logprobs=0)
    batch = InputBatch(block_size=4, max_blocks_per_request=4)
    sched = step([NewRequestData("a", tokens, num_prompt, params, [1, 2], 0, None)],
                 scheduled={"a": len(tokens)})  # fmt: skip
    batch.update(sched)
    inputs = batch.prepare(sched)
    assert inputs.sampling_ids == ["a"]
    result = ModelRunnerOutput({})
    prompt_logprobs(_Identity(), batch.states, inputs, torch.zeros(len(tokens), 4), result)
    return result


def test_a_prompt_gets_one_entry_per_token_after_the_first():
    # zero logits over a vocabulary of 4: every token's logprob is log(1 / 4)
    result = _run([1, 2, 3], 3)
    got = result.prompt_logprobs["a"]
    assert got[0] is None and [list(d) for d in got[1:]] == [[2], [3]]
    assert [d[t] for d, t in zip(got[1:], [2, 3], strict=True)] == pytest.approx([-math.log(4)] * 2)
    # all 4 tokens tie: each is ranked behind every one at least as likely (as vLLM)
    assert result.prompt_ranks == {"a": [None, 4, 4]}


def test_a_request_resumed_after_preemption_does_not_hand_them_again():
    """Recomputing prompt + outputs after a preemption samples again, but the prompt's
    logprobs went out with the first sampled token: a stream must not repeat them."""
    result = _run([1, 2, 3, 0], 3)
    assert result.prompt_logprobs == {} and result.prompt_ranks == {}


def test_a_request_later_in_the_step_scores_its_own_rows():
    """Request "b" after "a" (no prompt logprobs) in one step: its positions are the step's
    rows 2 .. 3, not the step's first rows."""
    ask = SamplingParams(max_tokens=4, prompt_logprobs=0)
    batch = InputBatch(block_size=4, max_blocks_per_request=4)
    sched = step([NewRequestData("a", [0, 1], 2, SamplingParams(max_tokens=4), [1], 0, None),
                  NewRequestData("b", [1, 2, 3], 3, ask, [2], 0, None)],
                 scheduled={"a": 2, "b": 3})  # fmt: skip
    batch.update(sched)
    inputs = batch.prepare(sched)
    hidden = torch.tensor([[9.0, 0, 0, 0], [0, 9, 0, 0], [0, 0, 1, 2], [3, 0, 0, 1], [0] * 4])
    result = ModelRunnerOutput({})
    prompt_logprobs(_Identity(), batch.states, inputs, hidden, result)
    want = hidden[2:4].log_softmax(-1)
    got = result.prompt_logprobs["b"]
    assert list(result.prompt_logprobs) == ["b"] and got[0] is None
    assert [list(d) for d in got[1:]] == [[2], [3]]
    assert [got[1][2], got[2][3]] == pytest.approx([want[0, 2].item(), want[1, 3].item()])
    assert result.prompt_ranks == {"b": [None, 2, 2]}  # 2 of [0, 0, 1, 2]; 3 of [3, 0, 0, 1]


def test_a_first_chunk_scores_its_rows_in_float32_and_hands_nothing_over():
    """A GPU's bfloat16 logits: the logprobs a user reads are float32's, not bfloat16's.
    Two of a 4-token prompt's tokens: their two positions, kept until the prompt is done."""
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.5], [0.3, 1.7, 0.1, 2.9]], dtype=torch.bfloat16)
    params = SamplingParams(max_tokens=4, prompt_logprobs=1)
    batch = InputBatch(block_size=4, max_blocks_per_request=4)
    sched = step([NewRequestData("a", [3, 2, 0, 1], 4, params, [1], 0, None)],
                 scheduled={"a": 2})  # fmt: skip
    batch.update(sched)
    inputs = batch.prepare(sched)
    result = ModelRunnerOutput({})
    prompt_logprobs(_Identity(), batch.states, inputs, logits, result)
    assert result.prompt_logprobs == {}
    want = logits.float().log_softmax(-1)
    got = batch.states["a"].prompt_logprobs
    assert batch.states["a"].prompt_ranks == [2, 3]  # kept with them until the prompt is done
    assert got == [
        {2: want[0, 2].item(), 3: want[0, 3].item()},
        {0: want[1, 0].item(), 3: want[1, 3].item()},
    ]


def test_positions_past_a_whole_number_of_chunks_are_scored(monkeypatch):
    """Logits are made PROMPT_LOGPROB_ROWS positions at a time: with 2 a time, a 4-token
    prompt's 3 positions are chunks [0, 2) and [2, 3), and each gets its entry."""
    from vllm_runner.worker import prompt_logprobs as module

    monkeypatch.setattr(module, "PROMPT_LOGPROB_ROWS", 2)
    got = _run([1, 2, 3, 0], 4).prompt_logprobs["a"]
    assert got[0] is None and [list(d) for d in got[1:]] == [[2], [3], [0]]
