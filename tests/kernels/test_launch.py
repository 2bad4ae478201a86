"""The launchers' host arithmetic agrees with Triton's own."""

import triton

from kernels.launch import cdiv, next_power_of_2


def test_next_power_of_2_and_cdiv_match_triton():
    for n in range(1, 5000):
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 3, 16, 64, 128):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
    assert next_power_of_2(0) == 1  # (callers pass max(x, 1))


def test_num_sms(monkeypatch):
    """132 (an H100) off CUDA; a CUDA device's own count, ``cuda`` being the current one."""
    import types

    import torch

    import kernels.launch as launch

    assert launch.num_sms(torch.device("cpu")) == 132
    counts = {0: 132, 1: 78}
    props = {i: types.SimpleNamespace(multi_processor_count=n) for i, n in counts.items()}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props[i])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    launch._cuda_sms.cache_clear()
    try:
        assert launch.num_sms(torch.device("cuda")) == 78
        assert launch.num_sms(torch.device("cuda", 0)) == 132
    finally:
        launch._cuda_sms.cache_clear()
