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
