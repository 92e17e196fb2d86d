"""Building blocks shared by the decoder families."""

from __future__ import annotations

import torch
from torch import nn

from kernels.elementwise import TORCH_OPS, ElementwiseOps


class RMSNorm(nn.Module):
    """RMSNorm in float32, cast back, as transformers does; optionally fused with a residual add.

    `forward(x, residual)` returns (norm(x + residual), x + residual): the residual stream
    and the next sublayer's input in one pass.
    """

    def __init__(self, size: int, eps: float, ops: ElementwiseOps = TORCH_OPS) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.ops = ops

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ops.rms_norm(x, self.weight, self.eps, residual)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding with cos/sin precomputed for every position up to the limit."""

    def __init__(
        self, inv_freq: torch.Tensor, scale: float, max_positions: int, ops: ElementwiseOps = TORCH_OPS
    ) -> None:
        super().__init__()
        self.ops = ops
        self.inv_freq = inv_freq.float().cpu()
        self.scale = scale
        self.max_positions = max_positions
        self.build(inv_freq.device)

    def build(self, device: torch.device) -> None:
        """(Re)compute the tables on `device`: after building the model on the meta device, say."""
        with torch.device("cpu"):  # not the meta device the model may be built under
            positions = torch.arange(self.max_positions, dtype=torch.float32)
            freqs = torch.outer(positions, self.inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
        # Kept in float32; cast to the activation dtype per call, as transformers does.
        self.register_buffer("cos", (emb.cos() * self.scale).to(device), persistent=False)
        self.register_buffer("sin", (emb.sin() * self.scale).to(device), persistent=False)

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate query [T, H, D] and key [T, KVH, D] by their positions [T]."""
        return self.ops.rotary(positions, query, key, self.cos, self.sin)
