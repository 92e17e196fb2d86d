"""Shared numerics for the GPU tests: fresh seeds and the relative error they compare by."""

from __future__ import annotations

import os

import torch

DEVICE = os.environ.get("PREFIXGATE_TEST_DEVICE", "cuda")  # "cpu" under TRITON_INTERPRET=1
HALF_TOLERANCE = 1e-2
FP32_TOLERANCE = 1e-3


def fresh_generator() -> tuple[torch.Generator, int]:
    """A generator with a new random seed each run (the seed is returned for failure messages)."""
    seed = int.from_bytes(os.urandom(4), "little")
    return torch.Generator().manual_seed(seed), seed


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64."""
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()
