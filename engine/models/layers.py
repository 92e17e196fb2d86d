"""Building blocks shared by the decoder families."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernels.elementwise import TORCH_OPS, ElementwiseOps


@dataclass(frozen=True)
class SkinnyMatmul:
    """A kernel for matmuls of at most `max_rows` rows: (x, weight, bias, silu_mul) -> y.

    `fold_silu`, on a down projection: the MLP hands it the gate_up output and the kernel
    applies the activation as it loads (one launch fewer); otherwise the activation runs first.
    """

    kernel: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, bool], torch.Tensor]
    max_rows: int
    fold_silu: bool = False


@dataclass(frozen=True)
class FusedQkv:
    """The qkv projection of at most `max_rows` rows with rotary and the KV store in one kernel:
    (x, weight, bias, positions, cos, sin, kv_cache, slot_mapping, heads, kv_heads) -> query."""

    kernel: Callable[..., torch.Tensor]
    max_rows: int


@dataclass(frozen=True)
class NormFold:
    """Batches of at most `max_rows` rows run each decoder layer with its RMSNorms folded into
    the matmuls around them (engine/models/decoder.py, DecoderLayer.forward_folded).

    `matmul` is (x, weight, bias, silu_mul, *, residual=None, row_stats=None, norm_stats=None,
    norm_eps) -> y, and `qkv` a FusedQkv kernel taking `norm_stats` and `norm_eps` the same way
    (kernels/triton_gemv.py has the contract, kernels/matmul_ref.py a torch version): the
    matmul before a norm adds the residual stream and leaves its rows' sums of squares in
    `stats`, the one after it normalises its input rows with them. The norms' own weights are
    multiplied into the qkv and gate_up weights (engine/skinny.py), so the other paths run those
    norms with unit weights and compute the same function.
    """

    matmul: Callable[..., torch.Tensor]
    qkv: Callable[..., torch.Tensor]
    max_rows: int
    stats: torch.Tensor  # kernels/matmul_ref.py row_stats_buffer(hidden, rows): 16 rows for the GEMV
    # The whole MLP in one call, for batches of at most `mlp_rows` rows, where it measured
    # faster than the two matmuls: (stream, gate_up weight, down weight, stats, norm_eps) ->
    # the stream after the MLP, leaving its statistics (kernels/triton_mlp.py fused_mlp).
    mlp: Callable[..., torch.Tensor] | None = None
    mlp_rows: int = 0


class Linear(nn.Linear):
    """nn.Linear whose calls of a few rows go to a skinny-matmul kernel when one is set.

    engine/skinny.py sets it, on a GPU, for the weight shapes where the kernel measured
    faster than cuBLAS; everywhere else this is nn.Linear (same parameters, same names).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.skinny: SkinnyMatmul | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skinny = self.skinny
        if skinny is not None and x.dim() == 2 and x.shape[0] <= skinny.max_rows:
            return skinny.kernel(x, self.weight, self.bias, False)
        return F.linear(x, self.weight, self.bias)


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
