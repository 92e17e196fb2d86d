"""Pure-torch versions of the fused skinny matmuls (kernels/triton_gemv.py, kernels/triton_qkv.py).

Each runs the unfused steps in the order the fused kernel folds them, rounding where those
steps round, so it is the oracle for the kernels and a stand-in with the same contract where
no GPU runs them (the model's folded-norm path in CPU tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.attention_ref import store_kv
from kernels.elementwise_ref import rotary_ref, silu_and_mul_ref

# A kernel asked for row statistics writes, per ROW_STATS_COLUMNS output columns, the sum of
# squares of each output row: stats[g, m] = sum(y[m, 32g : 32g + 32] ** 2), in float32. The
# next kernel adds the cdiv(width, 32) partials of a row up: how a norm of y folds into it.
ROW_STATS_COLUMNS = 32


def row_stats_buffer(width: int, rows: int, device: torch.device | str) -> torch.Tensor:
    """A buffer for the row statistics of [<= rows, width] outputs."""
    return torch.zeros((-(-width // ROW_STATS_COLUMNS), rows), dtype=torch.float32, device=device)


def write_row_stats(y: torch.Tensor, stats: torch.Tensor) -> None:
    rows, width = y.shape
    groups = -(-width // ROW_STATS_COLUMNS)
    squares = F.pad(y.float() ** 2, (0, groups * ROW_STATS_COLUMNS - width))
    stats[:groups, :rows] = squares.view(rows, groups, ROW_STATS_COLUMNS).sum(-1).T


def normalize_with_stats(x: torch.Tensor, stats: torch.Tensor, eps: float) -> torch.Tensor:
    """rmsnorm(x) with a unit weight, its mean square from row statistics, in float32 (the
    kernels scale the matmul's float32 accumulator, so the normed x is never rounded)."""
    rows, width = x.shape
    sum_squares = stats[: -(-width // ROW_STATS_COLUMNS), :rows].sum(0)
    return x.float() * torch.rsqrt(sum_squares / width + eps)[:, None]


def skinny_matmul_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    silu_mul: bool = False,
    *,
    residual: torch.Tensor | None = None,
    row_stats: torch.Tensor | None = None,
    norm_stats: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
) -> torch.Tensor:
    """kernels/triton_gemv.gemv's contract: act(x) @ weight^T (+ bias) (+ residual), act being
    silu-and-mul, or rmsnorm from `norm_stats`; `row_stats` gets the output's statistics."""
    dtype = x.dtype
    if silu_mul:
        x = silu_and_mul_ref(x)
    if norm_stats is not None:
        x = normalize_with_stats(x, norm_stats, norm_eps)
    y = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    if residual is not None:
        y = y + residual.float()
    y = y.to(dtype)
    if row_stats is not None:
        write_row_stats(y, row_stats)
    return y


def qkv_rotary_store_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    norm_stats: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
) -> torch.Tensor:
    """kernels/triton_qkv.qkv_rotary_store's contract: the rotated query; rotated keys and the
    values stored at the rows' slots (a negative slot stores nothing)."""
    rows = x.shape[0]
    head_dim = weight.shape[0] // (num_heads + 2 * num_kv_heads)
    dtype = x.dtype
    if norm_stats is not None:
        x = normalize_with_stats(x, norm_stats, norm_eps)
    projected = F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(dtype)
    q, k, v = projected.split(
        [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1
    )
    query, key = rotary_ref(
        positions, q.reshape(rows, num_heads, head_dim), k.reshape(rows, num_kv_heads, head_dim), cos, sin
    )
    keep = slot_mapping >= 0
    store_kv(key[keep], v.reshape(rows, num_kv_heads, head_dim)[keep], kv_cache, slot_mapping[keep])
    return query


def fused_mlp_ref(
    x: torch.Tensor,
    gate_up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    stats: torch.Tensor,
    norm_eps: float,
) -> torch.Tensor:
    """kernels/triton_mlp.fused_mlp's contract: the folded decoder's MLP from the residual
    stream x (its norm from `stats`) back to the stream, leaving the new rows' statistics."""
    gate_up = skinny_matmul_ref(x, gate_up_weight, norm_stats=stats, norm_eps=norm_eps)
    return skinny_matmul_ref(gate_up, down_weight, silu_mul=True, residual=x, row_stats=stats)
