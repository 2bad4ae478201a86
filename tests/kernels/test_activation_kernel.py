"""Fused SiLU-and-mul kernel vs the torch reference."""

import pytest
import torch
from kernel_testing import DTYPE_IDS, DTYPES, ROUNDING_ULPS, ULP

from kernels import reference
from kernels.activation import silu_and_mul


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("d", [64, 160, 1536])
def test_silu_and_mul_matches_reference(device: torch.device, dtype: torch.dtype, d: int) -> None:
    x = (3 * torch.randn(5, 2 * d, device=device)).to(dtype)
    out = silu_and_mul(x)
    expected = reference.silu_and_mul(x)
    assert out.dtype == dtype and out.shape == (5, d) and not out.isnan().any()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=ROUNDING_ULPS * ULP[dtype])


def test_silu_and_mul_strided_rows(device: torch.device) -> None:
    base = torch.randn(4, 300, device=device)
    x = base[:, :256]  # rows of a wider buffer
    torch.testing.assert_close(silu_and_mul(x), reference.silu_and_mul(x))
