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
    got = _run([1, 2, 3], 3).prompt_logprobs["a"]
    assert got[0] is None and [list(d) for d in got[1:]] == [[2], [3]]
    assert [d[t] for d, t in zip(got[1:], [2, 3], strict=True)] == pytest.approx([-math.log(4)] * 2)


def test_a_request_resumed_after_preemption_does_not_hand_them_again():
    """Recomputing prompt + outputs after a preemption samples again, but the prompt's
    logprobs went out with the first sampled token: a stream must not repeat them."""
    assert _run([1, 2, 3, 0], 3).prompt_logprobs == {}
