"""Pure-torch versions of the per-layer elementwise ops, rounding where transformers rounds.

They are the CPU path and the oracle for kernels/triton_elementwise.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * rmsnorm(x + residual), x + residual); without a residual, x itself is the sum.

    The sum is rounded to the activation dtype (transformers adds residuals in that dtype),
    the norm runs in float32, and the result is cast back before the weight multiplies it.
    """
    if residual is not None:
        x = x + residual
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype), x


def rotary_ref(
    positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate query [T, H, D] and key [T, KVH, D]; cos/sin are float32 [max_positions, D]."""
    cos_t = cos[positions].to(query.dtype).unsqueeze(1)
    sin_t = sin[positions].to(query.dtype).unsqueeze(1)
    return query * cos_t + _rotate_half(query) * sin_t, key * cos_t + _rotate_half(key) * sin_t


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def silu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] along the last dimension."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
