"""The int4 kernels' launch settings: default tiles, the step-down where a card refuses a
launch for shared memory, and what the launchers refuse."""

import pytest
import torch
from kernel_testing import make_int4, small_card
from triton.runtime.errors import OutOfResources

from kernels.launch import shared_memory_bytes
from kernels.quant_int4 import W4A16Config, default_config, w4a16_matmul
from kernels.quant_int4_half2 import half2_config
from kernels.quant_int4_mma import default_mma_config, smaller_configs, w4a16_mma


def test_default_config_fits_the_group() -> None:
    """The GEMV: rows padded to a power of 2, one K tile a group of 128 (shorter groups: the
    group), 64 channels at two warps, K split in 8 (16 from 64 tiles), at least 4 tiles a split."""
    assert default_config(1, 4096, 128) == W4A16Config(1, 64, 128, 8, num_warps=2)
    assert default_config(1, 14336, 128).split_k == 16  # from 64 K tiles
    assert default_config(1, 8064, 128).split_k == 8  # 63 tiles
    assert default_config(5, 4096, 32).block_m == 8
    assert default_config(8, 4096, 32).block_k == 32
    assert default_config(1, 576, 128).split_k == 1  # 5 tiles of K
    assert default_config(1, 2048, 128).split_k == 4  # 16 tiles of K
    assert default_config(2, 4096, 48).block_k == 16


def test_default_mma_config_fills_the_card() -> None:
    """Rows padded to 16-64 a program, 128 channels (64 at 16 rows), K split until ~264
    programs of 128 channels, one fewer where that cuts the K tiles evenly (at least 4 K
    tiles a split)."""

    config = default_mma_config
    assert config(3, 6144, 4096, 128) == W4A16Config(16, 64, 128, 6)  # 48 blocks of 128
    assert config(20, 28672, 4096, 128).split_k == 2  # 224 channel blocks
    assert config(64, 4096, 14336, 128) == W4A16Config(64, 128, 128, 8)  # not 9
    assert config(3, 4096, 1024, 128).split_k == 2  # 8 tiles of K: 4 a split
    # groups smaller than a K tile: at most 32 rows a program (Triton 3.6 cannot compile
    # their 64-row wgmma; the sm_90 compile test builds one)
    assert config(40, 6144, 4096, 32).block_m == 32
    assert config(40, 6144, 4096, 256).block_m == 64


def test_half2_config_splits_long_rows_more() -> None:
    """The packed-half GEMV: 16 channels x 512 inputs at two warps, K split in 2 from 8 tiles
    (a quarter each at least), in 4 from 24 (the 8B down projection)."""
    assert half2_config(4096) == W4A16Config(1, 16, 512, 2, num_warps=2)
    assert half2_config(14336).split_k == 4
    assert half2_config(1024).split_k == 1


def test_smaller_configs_halve_rows_then_stages() -> None:
    """What a card short of shared memory steps down through: rows, then pipeline stages."""
    got = [(c.block_m, c.num_stages) for c in smaller_configs(W4A16Config(64, 128, 128, 6))]
    assert got == [(64, 3), (32, 3), (16, 3), (16, 2), (16, 1)]


def test_default_steps_down_where_the_card_refuses(device, monkeypatch) -> None:
    """A launch Triton refuses for shared memory (fp32 x at 32-64 rows on a 99 KiB card)
    falls to the next smaller program, same result; the refusal is remembered, so the next
    call (a CUDA graph's capture) launches the fitting tile at once. Nothing fits: an error
    that names the tile and the card's limit."""
    import kernels.quant_int4_mma as qmma

    # a card whose programs take at most 16 rows
    launched = small_card(monkeypatch, lambda c: c.block_m <= 16, lambda c: c.block_m)
    weights = make_int4(256, 256, 128, device)
    x = torch.randn(40, 256, device=device)
    out = w4a16_mma(x, *weights, 128)
    assert launched == [64, 32, 16]
    want = w4a16_mma(x, *weights, 128, config=W4A16Config(16, 128, 128, 1))
    assert torch.equal(out, want)
    launched.clear()
    w4a16_mma(x, *weights, 128)
    assert launched == [16]
    launched.clear()  # a tile asked for is launched as it is, or refused
    with pytest.raises(OutOfResources):
        w4a16_mma(x, *weights, 128, config=W4A16Config(32, 128, 128, 1))
    assert launched == [32]
    monkeypatch.setattr(qmma, "_UNFIT", {})
    monkeypatch.setattr(qmma, "_FITTED", {})

    def full(kernel, x, *args, **kwargs):
        launched.append(args[5].block_m)
        raise OutOfResources(73_728, 49_152, "shared memory")

    monkeypatch.setattr(qmma, "launch_split", full)
    for attempt in range(2):  # the second call: every refusal remembered, none launched again
        launched.clear()
        with pytest.raises(RuntimeError, match=rf"no int4 tensor-core tile down from .*block_m="
                                               rf"64.*{shared_memory_bytes(device)} bytes.*num_"
                                               r"stages=1.*Required: 73728, Hardware limit: "
                                               r"49152"):  # fmt: skip
            w4a16_mma(x, *weights, 128)
        assert launched == ([64, 32, 16, 16, 16] if attempt == 0 else [])


def test_launcher_refuses_wrong_layouts(device) -> None:
    weights = make_int4(32, 128, 64, device)
    x = torch.randn(2, 128, device=device)
    with pytest.raises(AssertionError, match="block_k 128 must divide group_size 64"):
        w4a16_matmul(x[:1], *weights, 64, config=W4A16Config(1, 32, 128))
    with pytest.raises(AssertionError, match="takes block_m >= 16 and block_k 128"):
        w4a16_matmul(torch.randn(3, 128, device=device), *weights, 64,
                     config=W4A16Config(16, 32, 64))  # fmt: skip
    with pytest.raises(AssertionError, match=r"scale .* must be fp32 \(32, 1\)"):
        w4a16_matmul(x, *weights, 128)
    with pytest.raises(AssertionError, match=r"qweight torch.int32 \(32, 16\) must be int32"):
        w4a16_matmul(torch.randn(2, 64, device=device), *weights, 64)


def test_mma_ptx_unpack_only_where_it_applies(device, monkeypatch) -> None:
    """magic=True where the PTX unpack cannot run (no GPU, fp32 x, groups inside a K tile)
    is refused, naming what is missing; magic=None there takes the float unpack, as False."""
    x = torch.randn(3, 256, device=device)
    by_group = {g: make_int4(40, 256, g, device) for g in (64, 128)}
    unpack = "kernels.quant_int4_mma.ptx_unpack"
    monkeypatch.setattr(unpack, lambda device: False)  # the interpreter's answer
    with pytest.raises(AssertionError, match="got x torch.bfloat16 on .*, group_size 128"):
        w4a16_mma(x.bfloat16(), *by_group[128], 128, magic=True)
    monkeypatch.setattr(unpack, lambda device: True)  # a GPU's
    for x_, group in ((x, 128), (x.bfloat16(), 64), (x.half(), 64)):
        with pytest.raises(AssertionError, match=f"got x {x_.dtype} .*, group_size {group}"):
            w4a16_mma(x_, *by_group[group], group, magic=True)
        want = w4a16_mma(x_, *by_group[group], group, magic=False)
        assert torch.equal(w4a16_mma(x_, *by_group[group], group), want)
