"""When kernels launch with programmatic dependent launch (decided on the host)."""

import torch

import kernels.pdl as pdl


def test_pdl_only_on_capable_cuda_devices(monkeypatch):
    assert pdl.pdl_launch(torch.device("cpu")) == {"PDL": False}
    monkeypatch.setattr(pdl, "_capable", lambda index: index == 0)
    assert pdl.pdl_launch(torch.device("cuda:0")) == {"PDL": True, "launch_pdl": True}
    assert pdl.pdl_launch(torch.device("cuda:1")) == {"PDL": False}  # e.g. an A100 next to it
    monkeypatch.setenv("VLLM_RUNNER_PDL", "0")
    assert not pdl.pdl_enabled(torch.device("cuda:0"))


def test_pdl_capability_and_default_device(monkeypatch):
    """Compute capability 9.0 (H100 / H200) and up with a Triton that has the in-kernel wait;
    ``cuda`` without an index is the current device."""
    import triton.language as tl

    capability = {0: (9, 0), 1: (8, 9), 2: (10, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: capability[i])
    capable = pdl._capable.__wrapped__
    assert [capable(i) for i in (0, 1, 2)] == [True, False, True]
    monkeypatch.delattr(tl.extra.cuda, "gdc_wait")
    assert not capable(0)
    monkeypatch.setattr(pdl, "_capable", lambda index: index == 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert pdl.pdl_enabled(torch.device("cuda"))
