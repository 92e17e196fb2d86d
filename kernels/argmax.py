"""Greedy sampling's argmax: the Triton kernel on CUDA, torch's elsewhere."""

from __future__ import annotations

from collections.abc import Callable

import torch

ArgmaxFn = Callable[[torch.Tensor], torch.Tensor]


def torch_argmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


def default_argmax(device: torch.device) -> ArgmaxFn:
    from kernels.backend import triton_available

    if torch.device(device).type == "cuda" and triton_available():
        from kernels.triton_argmax import argmax_triton

        return argmax_triton
    return torch_argmax
