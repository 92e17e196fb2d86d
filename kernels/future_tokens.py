"""A step's input ids whose values the step before it sampled on the device.

With overlapped scheduling the host plans step N+1 before it has read step N's tokens: such a
row carries the placeholder -1 - slot, and the device's table of sampled tokens holds the value
at `slot` (engine/runner.py). Swapping them in took five torch kernels (~2 us each between two
steps at batch 1); the Triton kernel does it in one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ResolveFn = Callable[[torch.Tensor, torch.Tensor], None]


def resolve_torch(ids: torch.Tensor, future: torch.Tensor) -> None:
    """In place: ids[i] = future[-1 - ids[i]] where ids[i] < 0."""
    from_table = future[(-1 - ids).clamp_(min=0)]
    torch.where(ids >= 0, ids, from_table, out=ids)


def default_resolve(device: torch.device) -> ResolveFn:
    from kernels.backend import triton_available

    if torch.device(device).type == "cuda" and triton_available():
        from kernels.triton_future_tokens import resolve_triton

        return resolve_triton
    return resolve_torch
