"""Building blocks shared by the decoder families."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back, as transformers does, so bf16 outputs match."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding with cos/sin precomputed for every position up to the limit."""

    def __init__(self, inv_freq: torch.Tensor, scale: float, max_positions: int) -> None:
        super().__init__()
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
        cos = self.cos[positions].to(query.dtype).unsqueeze(1)
        sin = self.sin[positions].to(query.dtype).unsqueeze(1)
        return query * cos + _rotate_half(query) * sin, key * cos + _rotate_half(key) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
