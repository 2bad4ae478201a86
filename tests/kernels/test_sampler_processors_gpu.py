"""The sampler's logits processors on a GPU's half-precision logits (GPU only): rows with
bad words or choices get an fp32 copy, which their bans and masks go into (the pending
token's too); greedy rows then take kernels.argmax, sampled ones the sampling kernel."""

import pytest
import torch

from vllm_runner.sample.rows import SamplingRow
from vllm_runner.sample.sampler import Sampler
from vllm_runner.sampling_params import SamplingParams


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bad_words_on_half_precision_logits(device: torch.device, dtype: torch.dtype) -> None:
    """The sampler may read a GPU's logits in the model's dtype: rows with bad words get an
    fp32 copy, which the bans (fp32 values) go into, the pending token's too."""

    def row(sequences, output=(), num_pending=0) -> SamplingRow:
        params = SamplingParams(temperature=0.0)
        params.bad_words_token_ids = sequences
        return SamplingRow(params, [7, *output], 1, None, num_pending)

    vocab = 12
    logits = torch.zeros(2, vocab, dtype=dtype, device=device)
    logits[:, 5], logits[:, 6] = 2.0, 1.0
    rows = [row([(5,)]), row([(4, 5)], output=(1,), num_pending=1)]
    pending = torch.tensor([-1, 4], device=device)
    sampled, _ = Sampler(device, 0, vocab, dtype).sample(logits, rows, pending)
    assert sampled.tolist() == [6, 6]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_guided_choice_on_half_precision_logits(
    device: torch.device, dtype: torch.dtype, temperature: float
) -> None:
    """Rows with choices get an fp32 copy of a GPU's logits, which their masks go into, the
    pending token's too; greedy rows take kernels.argmax, sampled ones the sampling kernel."""

    def row(output: tuple, num_pending: int, seed: int) -> SamplingRow:
        params = SamplingParams(temperature=temperature)
        params.guided_choice_token_ids = [(1, 2, 3), (1, 2), (4,)]
        params.all_stop_token_ids = {9}
        return SamplingRow(params, [7, *output], 1, seed, num_pending)

    vocab = 12
    # (output on the host, pending token or -1, the tokens allowed next)
    cases = [((), -1, {1, 4}), ((1,), -1, {2}), ((), 4, {9}), ((1,), 2, {3, 9}), ((1, 2), 3, {9})]
    # 15 rows: argmax_rows takes up to 16
    rows = [row(out, int(p >= 0), s) for s in range(3) for out, p, _ in cases]
    pending = torch.tensor([p for _ in range(3) for _, p, _ in cases], device=device)
    logits = torch.zeros(len(rows), vocab, dtype=dtype, device=device)
    logits[:, 5] = 30.0  # the best token: in no choice
    logits[:, 4], logits[:, 9] = 1.0, 0.5  # greedy: 4 before 1, then 9 before 3
    sampled, _ = Sampler(device, 0, vocab, dtype).sample(logits, rows, pending)
    got = sampled.view(3, len(cases)).tolist()
    if temperature == 0.0:
        assert got == [[4, 2, 9, 9, 9]] * 3
    else:
        allowed = [case[2] for case in cases]
        assert all(t in allowed[i] for each in got for i, t in enumerate(each)), got
