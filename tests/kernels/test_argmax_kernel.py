"""The one-launch argmax of a few rows vs torch.argmax: ties, -inf rows, NaN, every part
split, and the arrival counts left at zero for the next launch."""

import math

import pytest
import torch

from kernels.argmax import MAX_PARTS, MAX_ROWS, argmax_rows


def _hard_rows(vocab: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Seven rows: random, ties (the first wins) across parts, a maximum at the last entry,
    all -inf, many ties, a tie at the end, and two NaNs (torch: the first NaN)."""
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(7, vocab, generator=g)
    x[1, [7, vocab // 2, vocab - 1]] = 9.0
    x[2, vocab - 1] = 9.0
    x[3] = -math.inf
    x[4] = x[4].round()
    x[5, [vocab - 3, vocab - 2]] = 9.0
    x[6, [vocab // 3, vocab - 1]] = math.nan
    return x.to(device=device, dtype=dtype)


@pytest.mark.parametrize("vocab", [1000, 1024, 2049])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_argmax_rows_is_torch_argmax(device: torch.device, vocab: int, dtype) -> None:
    x = _hard_rows(vocab, device, dtype)
    want = x.argmax(dim=-1)
    assert want[1] == 7 and want[6] == vocab // 3
    counts = torch.zeros(MAX_ROWS, dtype=torch.int32, device=device)
    for parts in (1, 3, 5, MAX_PARTS, None):  # (block 128: up to 17 parts hold keys)
        got = argmax_rows(x, counts, block=128, parts=parts)
        assert got.dtype == torch.int64 and torch.equal(got, want), (parts, got, want)
        assert not counts.any(), counts  # each row's last program reset its count
    one = argmax_rows(x[2:3], counts, block=128)  # a lone row, reusing the counts
    assert one.tolist() == [vocab - 1] and not counts.any()


def test_argmax_rows_takes_strided_rows_and_a_full_batch(device: torch.device) -> None:
    """Rows of a wider buffer (a graph's logits of a larger bucket); MAX_ROWS rows at once,
    each with its maximum in another part."""
    vocab = 640
    wide = torch.randn(MAX_ROWS, vocab + 64, device=device)
    for r in range(MAX_ROWS):
        wide[r, (r * 41) % vocab] = 50.0 + r
    logits = wide[:, :vocab]
    counts = torch.zeros(MAX_ROWS, dtype=torch.int32, device=device)
    got = argmax_rows(logits, counts, block=64)
    assert got.tolist() == [(r * 41) % vocab for r in range(MAX_ROWS)]
    assert not counts.any()


def test_argmax_rows_rejects_what_it_cannot_take(device: torch.device) -> None:
    counts = torch.zeros(MAX_ROWS, dtype=torch.int32, device=device)
    x = torch.randn(MAX_ROWS + 1, 256, device=device)
    with pytest.raises(AssertionError, match=f"{MAX_ROWS + 1} rows: 1 to {MAX_ROWS}"):
        argmax_rows(x, counts)
    with pytest.raises(AssertionError, match="dense last dim"):
        argmax_rows(torch.randn(256, 2, device=device).t(), counts)
    with pytest.raises(AssertionError, match="counts torch.int64"):
        argmax_rows(x[:2], counts.long())
    with pytest.raises(AssertionError, match="3 or more"):
        argmax_rows(x[:3], counts[:2])
    with pytest.raises(AssertionError, match=f"parts 0: 1 to {MAX_PARTS}"):
        argmax_rows(x[:2], counts, parts=0)
    with pytest.raises(AssertionError, match="torch.float64"):  # (fp32 would round it)
        argmax_rows(x[:2].double(), counts)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 4, MAX_ROWS])
def test_argmax_rows_at_llama3_vocabulary(device: torch.device, rows: int) -> None:
    """Llama 3's vocabulary in bf16 and fp32, the default tiles, many launches on one
    count buffer; rows with ties and NaN among them."""
    counts = torch.zeros(MAX_ROWS, dtype=torch.int32, device=device)
    for dtype in (torch.bfloat16, torch.float32):
        hard = _hard_rows(128256, device, dtype)
        for i in range(20):
            x = (torch.randn(rows, 128256, device=device) * 4).to(dtype)
            x[: min(rows, 7)] = hard[: min(rows, 7)] if i % 2 else x[: min(rows, 7)]
            assert torch.equal(argmax_rows(x, counts), x.argmax(dim=-1)), (dtype, i)
        assert not counts.any()


def test_sampler_greedy_takes_the_kernel_for_a_few_dense_rows(device: torch.device, monkeypatch):
    """Sampler.greedy (and sample with rows=None): 1 to MAX_ROWS rows with a dense last dim
    (rows of a wider buffer too) in one argmax_rows launch on the sampler's counts, other
    shapes torch's argmax; argmax's ids either way. (On the CPU the sampler is given the
    counts a GPU sampler owns, so the interpreter runs the kernel path.)"""
    import kernels.argmax as am
    from vllm_runner.sample.sampler import Sampler

    sampler = Sampler(device, 0)
    if sampler._argmax_counts is None:
        sampler._argmax_counts = torch.zeros(MAX_ROWS, dtype=torch.int32, device=device)
    launches = []
    real = am.argmax_rows

    def spy(logits, counts, *args, **kwargs):
        assert counts is sampler._argmax_counts
        launches.append(logits.shape[0])
        return real(
            logits, counts, *args, **kwargs, **({} if device.type == "cuda" else {"block": 64})
        )

    monkeypatch.setattr(am, "argmax_rows", spy)
    vocab = 300
    hard = _hard_rows(vocab, device, torch.float32)
    wide = torch.randn(MAX_ROWS + 1, vocab + 40, device=device)
    wide[:7, :vocab] = hard
    cases = [  # (logits, launched)
        (hard[2:3], True),
        (hard, True),
        (wide[:MAX_ROWS, :vocab], True),  # strided rows
        (wide[:, :vocab], False),  # too many rows
        (wide[:5, :vocab].t().contiguous().t(), False),  # no dense last dim
        (torch.tensor([[1.0, 1.0 + 1e-12]], dtype=torch.float64, device=device), False),
    ]
    for logits, launched in cases:
        before = len(launches)
        for got in (sampler.greedy(logits), sampler.sample(logits, None)[0]):
            assert torch.equal(got, logits.argmax(dim=-1)), (logits.shape, got)
        assert launches[before:] == ([logits.shape[0]] * 2 if launched else []), logits.shape
    assert not sampler._argmax_counts.any()
