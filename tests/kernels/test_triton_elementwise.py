"""Fused Triton norm / rotary / activation kernels against their torch references."""

from __future__ import annotations

import pytest
import torch

from kernels.elementwise_ref import rms_norm_ref, rotary_ref, silu_and_mul_ref

pytestmark = pytest.mark.gpu
triton_elementwise = pytest.importorskip("kernels.triton_elementwise")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert torch.isfinite(out).all()
    # Same roundings as the reference; only float32 summation order differs.
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    error = ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-12)).item()
    assert error < tolerance


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, cols", [(1, 576), (7, 4096), (33, 1536), (300, 64)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype: torch.dtype, rows: int, cols: int, with_residual: bool) -> None:
    x = torch.randn(rows, cols, dtype=dtype, device="cuda")
    weight = torch.rand(cols, dtype=dtype, device="cuda") + 0.5
    residual = torch.randn(rows, cols, dtype=dtype, device="cuda") if with_residual else None
    out, summed = triton_elementwise.rms_norm_triton(x, weight, 1e-5, residual)
    ref_out, ref_sum = rms_norm_ref(x, weight, 1e-5, residual)
    close(out, ref_out, dtype)
    assert torch.equal(summed, ref_sum)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (32, 8, 128), (12, 2, 128), (4, 4, 32)])
def test_rotary_on_views_of_the_fused_projection(
    dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int
) -> None:
    tokens = 37
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device="cuda")
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = q.view(tokens, heads, head_dim)
    k = k.view(tokens, kv_heads, head_dim)
    positions = torch.randint(0, 4000, (tokens,), device="cuda")
    angles = torch.outer(torch.arange(4096, device="cuda").float(), torch.rand(head_dim // 2, device="cuda"))
    emb = torch.cat((angles, angles), dim=-1)
    ref_q, ref_k = rotary_ref(positions, q.clone(), k.clone(), emb.cos(), emb.sin())
    out_q, out_k = triton_elementwise.rotary_triton(positions, q, k, emb.cos(), emb.sin())
    close(out_q, ref_q, dtype)
    close(out_k, ref_k, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, cols", [(1, 1536), (5, 14336), (64, 8960)])
def test_silu_and_mul(dtype: torch.dtype, rows: int, cols: int) -> None:
    gate_up = torch.randn(rows, 2 * cols, dtype=dtype, device="cuda")
    close(triton_elementwise.silu_and_mul_triton(gate_up), silu_and_mul_ref(gate_up), dtype)
