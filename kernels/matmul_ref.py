"""Pure-torch versions of the fused skinny matmuls (kernels/triton_gemv.py, kernels/triton_qkv.py).

Each runs the unfused steps in the order the fused kernel folds them, rounding where those
steps round, so it is the oracle for the kernels and a stand-in with the same contract where
no GPU runs them (the model's folded-norm path in CPU tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.attention_ref import store_kv
from kernels.elementwise_ref import rms_norm_ref, rotary_ref, silu_and_mul_ref


def unit_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """rmsnorm(x) with a unit weight, rounded to x's dtype."""
    return rms_norm_ref(x, torch.ones((), dtype=x.dtype, device=x.device), eps)[0]


def skinny_matmul_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    silu_mul: bool = False,
    *,
    residual: torch.Tensor | None = None,
    norm_eps: float | None = None,
) -> torch.Tensor:
    """kernels/triton_gemv.gemv's contract: act(x) @ weight^T (+ bias) (+ residual)."""
    if silu_mul:
        x = silu_and_mul_ref(x)
    if norm_eps is not None:
        x = unit_rms_norm(x, norm_eps)
    y = F.linear(x, weight, bias)
    return y if residual is None else y + residual


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
    norm_eps: float | None = None,
) -> torch.Tensor:
    """kernels/triton_qkv.qkv_rotary_store's contract: the rotated query; rotated keys and the
    values stored at the rows' slots (a negative slot stores nothing)."""
    rows = x.shape[0]
    head_dim = weight.shape[0] // (num_heads + 2 * num_kv_heads)
    if norm_eps is not None:
        x = unit_rms_norm(x, norm_eps)
    q, k, v = F.linear(x, weight, bias).split(
        [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1
    )
    query, key = rotary_ref(
        positions, q.reshape(rows, num_heads, head_dim), k.reshape(rows, num_kv_heads, head_dim), cos, sin
    )
    keep = slot_mapping >= 0
    store_kv(key[keep], v.reshape(rows, num_kv_heads, head_dim)[keep], kv_cache, slot_mapping[keep])
    return query
