"""The per-layer elementwise ops the model calls: fused Triton kernels on CUDA, torch elsewhere."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels.elementwise_ref import rms_norm_ref, rotary_ref, silu_and_mul_ref

NormFn = Callable[[torch.Tensor, torch.Tensor, float, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]
RotaryFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]
]


@dataclass(frozen=True)
class ElementwiseOps:
    name: str
    rms_norm: NormFn  # (x, weight, eps, residual) -> (normed, x + residual)
    rotary: RotaryFn  # (positions, query, key, cos, sin) -> (query, key)
    silu_and_mul: Callable[[torch.Tensor], torch.Tensor]


TORCH_OPS = ElementwiseOps("torch", rms_norm_ref, rotary_ref, silu_and_mul_ref)


def default_elementwise(device: torch.device) -> ElementwiseOps:
    from kernels.backend import triton_available

    if torch.device(device).type == "cuda" and triton_available():
        from kernels.triton_elementwise import rms_norm_triton, rotary_triton, silu_and_mul_triton

        return ElementwiseOps("triton", rms_norm_triton, rotary_triton, silu_and_mul_triton)
    return TORCH_OPS
