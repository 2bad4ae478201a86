"""The launchers' argument checks: each bad input fails on the host, before any launch, with
an error that names the offending value (a kernel fed it reads out of bounds, or the wrong
elements, with no error at all)."""

import pytest
import torch

from kernels.activation import silu_and_mul
from kernels.kv_cache import rotary_and_write_kv_cache, write_kv_cache
from kernels.rms_norm import rms_norm
from kernels.rotary import rotary_embedding
from kernels.sampling import sample_rows


def _cos_sin(rotary_dim: int = 8, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.zeros(16, rotary_dim, device=device)


def test_rms_norm_checks(device: torch.device) -> None:
    x = torch.randn(3, 8, device=device)
    with pytest.raises(AssertionError, match=r"weight \(7,\) != \(8,\)"):
        rms_norm(x, torch.ones(7, device=device), 1e-6)
    with pytest.raises(AssertionError, match=r"x torch.int32"):
        rms_norm(x.int(), torch.ones(8, device=device), 1e-6)
    with pytest.raises(AssertionError, match=r"x needs a dense last dim"):
        rms_norm(torch.randn(3, 16, device=device)[:, ::2], torch.ones(8, device=device), 1e-6)
    bad = x.half()
    with pytest.raises(
        AssertionError, match=r"residual \(3, 8\) torch.float16 vs x \(3, 8\) torch.float32"
    ):
        rms_norm(x, torch.ones(8, device=device), 1e-6, bad)


def test_silu_and_mul_checks(device: torch.device) -> None:
    with pytest.raises(AssertionError, match=r"x \(2, 5\) must be \[tokens, 2 \* d\]"):
        silu_and_mul(torch.randn(2, 5, device=device))
    with pytest.raises(AssertionError, match=r"x needs a dense last dim"):
        silu_and_mul(torch.randn(2, 8, device=device)[:, ::2])
    with pytest.raises(AssertionError, match=r"x torch.int64"):
        silu_and_mul(torch.zeros(2, 4, dtype=torch.int64, device=device))


def test_rotary_checks(device: torch.device) -> None:
    q, k = torch.randn(3, 4, 8, device=device), torch.randn(3, 2, 8, device=device)
    pos = torch.arange(3, device=device)
    cs = _cos_sin(device=device)
    with pytest.raises(AssertionError, match=r"rotary_dim 10 must be even and in \[2, head_dim 8"):
        rotary_embedding(pos, q, k, torch.zeros(16, 10, device=device))
    with pytest.raises(AssertionError, match=r"rotary_dim 5 must be even"):
        rotary_embedding(pos, q, k, torch.zeros(16, 5, device=device))
    with pytest.raises(AssertionError, match=r"key \(3, 2, 4\)"):
        rotary_embedding(pos, q, torch.randn(3, 2, 4, device=device), cs)
    with pytest.raises(AssertionError, match=r"positions torch.float32"):
        rotary_embedding(pos.float(), q, k, cs)
    with pytest.raises(AssertionError, match=r"query torch.float32 != key torch.float16"):
        rotary_embedding(pos, q, k.half(), cs)
    with pytest.raises(AssertionError, match=r"cos_sin_cache needs a dense last dim"):
        rotary_embedding(pos, q, k, torch.zeros(16, 16, device=device)[:, ::2])


def _kv(device: torch.device, **over: torch.Tensor) -> dict[str, torch.Tensor]:
    args = {
        "key": torch.randn(3, 2, 8, device=device),
        "value": torch.randn(3, 2, 8, device=device),
        "k_cache": torch.zeros(2, 4, 2, 8, device=device),
        "v_cache": torch.zeros(2, 4, 2, 8, device=device),
        "slot_mapping": torch.arange(3, device=device),
    }
    return {**args, **over}


def test_write_kv_cache_checks(device: torch.device) -> None:
    v_t = torch.zeros(2, 2, 4, 8, device=device).transpose(1, 2)  # same shape, other strides
    with pytest.raises(AssertionError, match=r"k_cache and v_cache must share strides"):
        write_kv_cache(**_kv(device, v_cache=v_t))
    with pytest.raises(AssertionError, match=r"slot_mapping torch.float32"):
        write_kv_cache(**_kv(device, slot_mapping=torch.zeros(3, device=device)))


def _rkv(device: torch.device, **over: torch.Tensor) -> dict[str, torch.Tensor]:
    args = {
        "positions": torch.arange(3, device=device),
        "query": torch.randn(3, 4, 8, device=device),
        "cos_sin_cache": _cos_sin(device=device),
        **_kv(device),
    }
    return {**args, **over}


def test_rotary_and_write_kv_cache_checks(device: torch.device) -> None:
    fp16_cache = torch.zeros(2, 4, 2, 8, dtype=torch.float16, device=device)
    with pytest.raises(
        AssertionError,
        match=r"cache torch.float16 / torch.float16 must be the query's torch.float32 or fp8",
    ):
        rotary_and_write_kv_cache(**_rkv(device, k_cache=fp16_cache, v_cache=fp16_cache))
    strided = torch.randn(3, 2, 16, device=device)[..., ::2]
    with pytest.raises(AssertionError, match=r"head_dim must be dense"):
        rotary_and_write_kv_cache(**_rkv(device, value=strided))
    with pytest.raises(AssertionError, match=r"positions \(3,\) / slot_mapping \(2,\)"):
        rotary_and_write_kv_cache(**_rkv(device, slot_mapping=torch.arange(2, device=device)))
    meta = torch.empty(16, 8, device="meta")
    with pytest.raises(AssertionError, match=r"all inputs must be on one device"):
        rotary_and_write_kv_cache(**_rkv(device, cos_sin_cache=meta))


def test_sample_rows_checks(device: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    import kernels.sampling as sampling

    logits = torch.zeros(2, 64, device=device)
    params = torch.zeros(2, 4, device=device)
    seeds = torch.zeros(2, dtype=torch.int64, device=device)
    with pytest.raises(AssertionError, match=r"params \(2, 3\) torch.float32, want \(2, 4\) float"):
        sample_rows(logits, params[:, :3], seeds)
    with pytest.raises(AssertionError, match=r"params \(2, 4\) torch.float64"):
        sample_rows(logits, params.double(), seeds)
    with pytest.raises(AssertionError, match=r"params need a dense last dim"):
        sample_rows(logits, torch.zeros(2, 8, device=device)[:, ::2], seeds)
    with pytest.raises(AssertionError, match=r"seeds \(2,\) torch.int32, want \(2,\) int64"):
        sample_rows(logits, params, seeds.int())
    with pytest.raises(AssertionError, match=r"logits need a dense last dim"):
        sample_rows(torch.zeros(2, 128, device=device)[:, ::2], params, seeds)
    # a forced split past MAX_SPLIT (32) is refused even where enough programs are resident
    # (no launch: the interpreter runs a split row's programs one by one, and would wait)
    monkeypatch.setattr(sampling, "_programs", lambda device: 1000)
    monkeypatch.setattr(sampling, "_sample_kernel", {})
    with pytest.raises(AssertionError, match=r"split 64 x 2 rows: 1 to 32 a row"):
        sample_rows(logits, params, seeds, split=64)


def test_seeds_of_the_wrong_length_are_named(device: torch.device) -> None:
    """Seeds for 3 rows of 2: the error names their shape (it named only their dtype, which
    was right)."""
    logits, params = torch.zeros(2, 64, device=device), torch.zeros(2, 4, device=device)
    with pytest.raises(AssertionError, match=r"seeds \(3,\) torch.int64, want \(2,\) int64"):
        sample_rows(logits, params, torch.zeros(3, dtype=torch.int64, device=device))


def test_a_query_or_key_that_is_not_3d_is_named(device: torch.device) -> None:
    """A 2-D query (e.g. the unsplit qkv output) or key fails with its shape named, not with
    "not enough values to unpack"."""
    q2, k = torch.randn(3, 32, device=device), torch.randn(3, 2, 8, device=device)
    pos, cs = torch.arange(3, device=device), _cos_sin(device=device)
    cache = torch.zeros(2, 4, 2, 8, device=device)
    query_2d = r"query \(3, 32\) must be \[tokens, heads, head_dim\]"
    with pytest.raises(AssertionError, match=query_2d):
        rotary_embedding(pos, q2, k, cs)
    with pytest.raises(AssertionError, match=query_2d):
        rotary_and_write_kv_cache(pos, q2, k, k, cs, cache, cache, pos)
    with pytest.raises(AssertionError, match=r"key \(3, 16\) must be \[tokens, kv_heads, head_dim"):
        write_kv_cache(k.view(3, 16), k.view(3, 16), cache, cache, pos)
