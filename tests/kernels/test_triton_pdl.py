"""When the Triton kernels launch with programmatic dependent launch (kernels/triton_pdl.py)."""

from __future__ import annotations

import pytest
import torch

triton_pdl = pytest.importorskip("kernels.triton_pdl")


def test_no_pdl_off_the_gpu_or_when_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not triton_pdl.use_pdl(torch.device("cpu"))
    monkeypatch.setenv("PREFIXGATE_PDL", "0")
    assert not triton_pdl.use_pdl(torch.device("cuda", 0))  # decided before asking the device
