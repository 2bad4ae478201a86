"""The sampler's logits processors on a GPU's half-precision logits (GPU only): rows with
bad words, choices, JSON mode or a regex get an fp32 copy, which their bans and masks go into (the
pending token's too); greedy rows then take kernels.argmax, sampled ones the sampling kernel."""

import pytest
import torch

from vllm_runner.sample import json_grammar as g
from vllm_runner.sample.json_masks import JsonMasks, JsonVocab
from vllm_runner.sample.regex_masks import RegexMasks
from vllm_runner.sample.rows import SamplingRow
from vllm_runner.sample.sampler import Sampler
from vllm_runner.sample.token_masks import TokenBytes
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


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_json_object_on_half_precision_logits(device: torch.device, dtype: torch.dtype) -> None:
    """JSON rows' masks live on the logits' device: 40 steps of distinct random logits,
    greedy (each token the best allowed one, as an fp32 reference on the host picks) and
    sampled (every token allowed), each row's text a JSON prefix, an object once ended."""
    pieces = [None, b"{", b"}", b"[", b"]", b'"a"', b": ", b",", b"1", b"-", b".5", b"true",
              b" ", b'"', b"x", b"}]}", b'{"', b"1}", None]  # fmt: skip
    eos = 0
    vocab = len(pieces)
    sampler = Sampler(device, 0, vocab, dtype)
    masks = sampler.json_masks = JsonMasks(JsonVocab(pieces))

    def row(temperature: float, seed: int | None) -> SamplingRow:
        params = SamplingParams(temperature=temperature, json_object=True, seed=seed)
        params.all_stop_token_ids = {eos}
        return SamplingRow(params, [7], 1, seed)

    rows = [row(0.0, None), row(1.0, 1), row(1.0, 2)]
    texts, ended = [b""] * 3, [False] * 3
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        live = [i for i in range(3) if not ended[i]]
        if not live:
            break
        values = torch.stack([torch.randperm(vocab, generator=gen) for _ in live]) * 0.25
        logits = values.to(device=device, dtype=dtype)  # exact in both dtypes: no ties
        greedy_row = rows[0] if 0 in live else None
        expected = None
        if greedy_row is not None:  # the reference: the best token the host's mask allows
            cursor = masks.advance(greedy_row, {eos})
            keep = masks.get(cursor).host.copy()
            keep[eos] = cursor.state == g.DONE
            expected = int(torch.where(torch.from_numpy(keep), values[0], -1.0).argmax())
        sampled, _ = sampler.sample(logits, [rows[i] for i in live])
        for slot, i in enumerate(live):
            token = int(sampled[slot])
            if i == 0:
                assert token == expected
            if token == eos:
                assert g.is_json_object(texts[i]), texts[i]
                ended[i] = True
            else:
                texts[i] += pieces[token]
                assert g.is_json_prefix(texts[i]), texts[i]
            rows[i].token_ids.append(token)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_guided_regex_on_half_precision_logits(
    device: torch.device, dtype: torch.dtype, temperature: float
) -> None:
    """Rows with a regex get an fp32 copy of a GPU's logits, which their masks (made on the
    host, kept on the device) go into; greedy rows take kernels.argmax, sampled ones the
    sampling kernel. "(ab)+é?" over bytes: "é" is C3 A9, two tokens here."""
    pieces = [None, b"a", b"b", b"ab", b"c", b"\xc3", b"\xa9", b"x"]

    def row(output: tuple, seed: int) -> SamplingRow:
        params = SamplingParams(temperature=temperature, guided_regex="(ab)+é?")
        params.all_stop_token_ids = {0}
        return SamplingRow(params, [7, *output], 1, seed)

    # (output, the tokens allowed next): EOS (0) once "ab" is whole, C3 then only A9
    cases = [((), {1, 3}), ((1,), {2}), ((3,), {0, 1, 3, 5}), ((3, 5), {6})]
    rows = [row(out, s) for s in range(3) for out, _ in cases]  # 12 rows: one argmax launch
    logits = torch.zeros(len(rows), len(pieces), dtype=dtype, device=device)
    logits[:, 7] = 30.0  # the best token: in no match
    logits[:, 3], logits[:, 0] = 1.0, 0.5  # greedy: "ab" wherever it is allowed
    sampler = Sampler(device, 0, len(pieces), dtype)
    sampler.regex_masks = RegexMasks(TokenBytes(pieces))
    sampled, _ = sampler.sample(logits, rows)
    got = sampled.view(3, len(cases)).tolist()
    if temperature == 0.0:
        assert got == [[3, 2, 3, 6]] * 3
    else:
        allowed = [case[1] for case in cases]
        assert all(t in allowed[i] for each in got for i, t in enumerate(each)), got
    mask = sampler.regex_masks.masks[("(ab)+é?", rows[0].regex_cursor.state)]
    assert mask.device is not None and mask.device.device.type == "cuda"
