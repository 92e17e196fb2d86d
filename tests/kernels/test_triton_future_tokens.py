"""The one-launch swap of placeholder ids (kernels/triton_future_tokens.py) against torch's."""

from __future__ import annotations

import pytest
import torch

from kernels.future_tokens import resolve_torch
from testkit.numerics import DEVICE, fresh_generator

pytestmark = pytest.mark.gpu
triton_future_tokens = pytest.importorskip("kernels.triton_future_tokens")


@pytest.mark.parametrize("rows", [0, 1, 5, 1024, 1500])
def test_resolve_matches_torch(rows: int) -> None:
    gen, seed = fresh_generator()
    future = torch.randint(0, 128256, (512,), generator=gen)
    ids = torch.randint(0, 128256, (rows,), generator=gen)
    placeholders = torch.rand(rows, generator=gen) < 0.5
    ids[placeholders] = -1 - torch.randint(0, 512, (int(placeholders.sum()),), generator=gen)
    want = ids.clone()
    resolve_torch(want, future)
    got = ids.to(DEVICE)
    triton_future_tokens.resolve_triton(got, future.to(DEVICE))
    assert torch.equal(got.cpu(), want), f"seed {seed}"
