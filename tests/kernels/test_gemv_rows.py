"""The few-row GEMV (2, 4 or 8 rows of a 16-bit weight) and its fusions vs the torch
reference, and each row against the one-row GEMV."""

import pytest
import torch
from test_gemv import EPS, FUSED_TOL, HALF, HALF_IDS, assert_fused_close

from kernels import reference
from kernels.gemv import GemvTiles, linear_one_row
from kernels.gemv_rows import MAX_ROWS, RowsTiles, linear_rows, takes_rows

ROWS = (2, 3, 8, MAX_ROWS)


def make(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device, gated: bool = False):
    w = (torch.randn(2 * n if gated else n, k, device=device) * k**-0.5).to(dtype)
    x = torch.randn(m, k, device=device).to(dtype)
    return x, w


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize(
    "n,k,tiles",
    [(64, 256, RowsTiles(16, 128, split=1)), (72, 300, RowsTiles(32, 64, split=1)),
     (40, 96, RowsTiles(16, 32, 2, 1, split=3)), (48, 512, RowsTiles(16, 64, 4, 3, split=3)),
     (72, 300, RowsTiles(16, 32, split=4)), (24, 1024, None)],
    ids=["whole-tiles", "ragged", "split3", "split3-ragged-chunks", "split4-ragged", "default"],
)  # fmt: skip
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_rows_match_reference(device, dtype, m, n, k, tiles, gated) -> None:
    x, w = make(m, n, k, dtype, device, gated)
    bias = torch.randn(w.shape[0], device=device).to(dtype)
    out = linear_rows(x, w, bias, gated=gated, tiles=tiles)
    assert out.shape == (m, n) and out.dtype == dtype
    ref = reference.linear_one_row(x, w, bias, gated=gated)
    torch.testing.assert_close(out.float(), ref.float(), **FUSED_TOL[dtype])


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("n,k,tiles", [(64, 256, RowsTiles(16, 128, split=1)),
                                       (72, 300, RowsTiles(32, 64, split=3))],
                         ids=["whole-tiles", "split"])  # fmt: skip
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_rows_norm_and_residual_match_reference(device, dtype, m, n, k, tiles, gated) -> None:
    """Each row normed by its own RMS (rows scaled differently, so a shared or missing
    normalisation shows) and given its own residual."""
    x, w = make(m, n, k, dtype, device, gated)
    scales = torch.arange(1, m + 1, device=device, dtype=torch.float32)[:, None]
    x = (x.float() * scales + 1).to(dtype)
    g = (torch.rand(k, device=device) + 0.5).to(dtype)
    r = torch.randn(m, n, device=device).to(dtype)
    kw = {"gated": gated, "norm": (g, EPS), "residual": r}
    out = linear_rows(x, w, tiles=tiles, **kw)
    for i in range(m):  # row by row: the tolerance scales with each row's own outputs
        ref = reference.linear_one_row(x[i : i + 1], w, gated=gated, norm=(g, EPS),
                                       residual=r[i : i + 1])  # fmt: skip
        assert_fused_close(out[i : i + 1], ref)


@pytest.mark.parametrize("m", ROWS)
def test_each_row_is_the_one_row_gemv(device: torch.device, m: int) -> None:
    """Every fusion at once: row i of the few-row kernel equals the one-row GEMV of row i
    within rounding (the sums meet in different orders)."""
    n, k, tiles = 40, 320, RowsTiles(16, 64, split=2)
    x, w = make(m, n, k, torch.bfloat16, device, gated=True)
    g = (torch.rand(k, device=device) + 0.5).bfloat16()
    r = torch.randn(m, n, device=device).bfloat16()
    out = linear_rows(x, w, gated=True, norm=(g, EPS), residual=r, tiles=tiles)
    for i in range(m):
        one = linear_one_row(x[i : i + 1], w, gated=True, norm=(g, EPS),
                             residual=r[i : i + 1], tiles=GemvTiles(8, 64))  # fmt: skip
        assert_fused_close(out[i : i + 1], one)


def test_rows_write_into_out(device: torch.device) -> None:
    """``out`` rows of a wider buffer (the decode graphs' static outputs): written in place,
    nothing around them touched."""
    n, k, tiles = 24, 128, RowsTiles(16, 64)
    x, w = make(4, n, k, torch.bfloat16, device)
    buf = torch.full((4, n + 8), float("nan"), device=device, dtype=torch.bfloat16)
    got = linear_rows(x, w, tiles=tiles, out=buf[:, 4 : 4 + n])
    assert got.data_ptr() == buf[0, 4].data_ptr()
    assert torch.equal(got, linear_rows(x, w, tiles=tiles))
    assert buf[:, :4].isnan().all() and buf[:, 4 + n :].isnan().all()


def test_rows_refuse_what_they_cannot_take(device: torch.device) -> None:
    x, w = make(4, 32, 64, torch.bfloat16, device)
    assert takes_rows(x, w) and takes_rows(x[:3], w) and not takes_rows(x[:1], w)
    assert not takes_rows(torch.cat([x] * 5), w)  # 20 rows: cuBLAS
    assert not takes_rows(x.half(), w) and not takes_rows(x.float(), w.float())
    with pytest.raises(AssertionError, match=r"takes 2 to 16 .* got x .* \(20, 64\)"):
        linear_rows(torch.cat([x] * 5), w)
    with pytest.raises(AssertionError, match=r"residual .* must be torch.bfloat16 \(4, 32\)"):
        linear_rows(x, w, residual=torch.zeros(1, 32, device=device, dtype=torch.bfloat16))
    with pytest.raises(AssertionError, match="gated needs"):
        linear_rows(x, w[:31], gated=True)


@pytest.mark.gpu
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize(
    "n,k,gated",
    [(3072, 2048, False), (2048, 2048, False), (8192, 2048, True), (2048, 8192, False),
     (6144, 4096, False), (14336, 4096, True), (4096, 14336, False), (128256, 2048, False)],
)  # fmt: skip
def test_rows_llama_shapes(device: torch.device, m: int, n: int, k: int, gated: bool) -> None:
    """The Llama-3.2-1B and Llama-3-8B projections (and the 1B LM head) with the fusions the
    decode layer uses, at the default tiles."""
    x, w = make(m, n, k, torch.bfloat16, device, gated)
    g = (torch.rand(k, device=device) + 0.5).bfloat16()
    r = torch.randn(m, n, device=device).bfloat16()
    kw = {"gated": gated, "norm": (g, EPS)} if gated or n > k else {"residual": r}
    if n > 100_000:
        kw = {}
    out = linear_rows(x, w, **kw)
    for i in range(m):
        one = {**kw, "residual": r[i : i + 1]} if "residual" in kw else kw
        assert_fused_close(out[i : i + 1], reference.linear_one_row(x[i : i + 1], w, **one))


def test_split_k_leaves_its_counters_at_zero(device: torch.device) -> None:
    """The tile's last split zeroes its count, so the next launch (a graph replay) starts
    from zero; the splits' partials are summed in split order: identical on a repeat."""
    from kernels.gemv_rows import _counters

    n, k = 72, 300
    x, w = make(4, n, k, torch.bfloat16, device, gated=True)
    g = (torch.rand(k, device=device) + 0.5).bfloat16()
    tiles = RowsTiles(16, 32, split=5)
    first = linear_rows(x, w, gated=True, norm=(g, EPS), tiles=tiles)
    assert not _counters(x.device).any()
    assert torch.equal(linear_rows(x, w, gated=True, norm=(g, EPS), tiles=tiles), first)
