"""The skinny-matmul kernel against F.linear, and the engine's Linear switching to it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.elementwise_ref import silu_and_mul_ref
from kernels.matmul_ref import row_stats_buffer, skinny_matmul_ref

pytestmark = pytest.mark.gpu
triton_gemv = pytest.importorskip("kernels.triton_gemv")


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [0, 1, 2, 5, 8, 16])
@pytest.mark.parametrize(
    "n, k", [(6144, 4096), (4096, 4096), (100, 72), (2048, 1536), (33, 1000), (151936, 64)]
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_matches_linear(dtype: torch.dtype, rows: int, n: int, k: int, with_bias: bool) -> None:
    x = torch.randn(rows, k, dtype=dtype, device="cuda")
    weight = torch.randn(n, k, dtype=dtype, device="cuda") * k**-0.5
    bias = torch.randn(n, dtype=dtype, device="cuda") if with_bias else None
    out = triton_gemv.gemv(x, weight, bias)
    ref = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    assert out.shape == (rows, n) and out.dtype == dtype
    if rows:
        assert relative_error(out, ref) < 1e-2


@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("n, k", [(4096, 14336), (1536, 8960), (64, 300)])
def test_gemv_folds_the_activation_in(rows: int, n: int, k: int) -> None:
    gate_up = torch.randn(rows, 2 * k, dtype=torch.bfloat16, device="cuda") * 2
    weight = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * k**-0.5
    out = triton_gemv.gemv(gate_up, weight, silu_mul=True)
    ref = F.linear(silu_and_mul_ref(gate_up).float(), weight.float())
    assert relative_error(out, ref) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("n, k", [(4096, 4096), (100, 72), (40, 1000)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_carries_a_norm_to_the_next_matmul(
    dtype: torch.dtype, rows: int, n: int, k: int, with_bias: bool
) -> None:
    # The decoder's folded path: y = x @ W1^T + stream, leaving y's row statistics (o_proj, down);
    # then rmsnorm(y) @ W2^T from them (gate_up, qkv). Stale statistics must not matter.
    x = torch.randn(rows, k, dtype=dtype, device="cuda")
    first = torch.randn(n, k, dtype=dtype, device="cuda") * k**-0.5
    second = torch.randn(300, n, dtype=dtype, device="cuda") * n**-0.5
    bias = torch.randn(300, dtype=dtype, device="cuda") if with_bias else None
    residual = torch.randn(rows, n, dtype=dtype, device="cuda")
    stats = row_stats_buffer(n, 16, "cuda").fill_(3.0)
    y = triton_gemv.gemv(x, first, residual=residual, row_stats=stats)
    assert relative_error(y, F.linear(x.float(), first.float()) + residual.float()) < 1e-2
    y32 = y.float()
    torch.testing.assert_close(stats[:, :rows].sum(0), y32.pow(2).sum(-1), rtol=1e-4, atol=1e-3)
    out = triton_gemv.gemv(y, second, bias, norm_stats=stats, norm_eps=1e-5)
    normed = y32 * torch.rsqrt(y32.pow(2).mean(-1, keepdim=True) + 1e-5)
    want = F.linear(normed, second.float(), None if bias is None else bias.float())
    assert relative_error(out, want) < 1e-2
    # The torch reference of the contract (kernels/matmul_ref.py) agrees.
    ref_stats = row_stats_buffer(n, 16, "cuda")
    ref_y = skinny_matmul_ref(x, first, residual=residual, row_stats=ref_stats)
    assert relative_error(ref_y, y.float()) < 1e-2
    ref_out = skinny_matmul_ref(ref_y, second, bias, norm_stats=ref_stats, norm_eps=1e-5)
    assert relative_error(ref_out, out.float()) < 1e-2


def test_gemv_folds_the_activation_and_the_residual_together() -> None:
    gate_up = torch.randn(2, 2 * 640, dtype=torch.bfloat16, device="cuda") * 2
    weight = torch.randn(256, 640, dtype=torch.bfloat16, device="cuda") * 640**-0.5
    residual = torch.randn(2, 256, dtype=torch.bfloat16, device="cuda")
    stats = row_stats_buffer(256, 16, "cuda")
    out = triton_gemv.gemv(gate_up, weight, silu_mul=True, residual=residual, row_stats=stats)
    ref = F.linear(silu_and_mul_ref(gate_up).float(), weight.float()) + residual.float()
    assert relative_error(out, ref) < 1e-2
    torch.testing.assert_close(stats[:, :2].sum(0), out.float().pow(2).sum(-1), rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="not of an activation"):
        triton_gemv.gemv(gate_up, weight, silu_mul=True, norm_stats=row_stats_buffer(640, 16, "cuda"))
    with pytest.raises(ValueError, match="residual"):
        triton_gemv.gemv(gate_up, weight, silu_mul=True, residual=residual[:, :255])
    with pytest.raises(ValueError, match="row stats"):
        triton_gemv.gemv(gate_up, weight, silu_mul=True, row_stats=row_stats_buffer(100, 16, "cuda"))


@pytest.mark.parametrize("rows, block_m", [(17, 32), (32, 32), (50, 64), (100, 128), (128, 128), (3, 64)])
@pytest.mark.parametrize("n, k", [(6144, 4096), (100, 72), (28672, 4096)])
def test_skinny_gemm_tiles_match_linear(rows: int, block_m: int, n: int, k: int) -> None:
    # The same kernel with block_m-row tiles (kernels/bench_gemv.py --rows 32,64,128 times them).
    x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda")
    weight = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * k**-0.5
    launch = {"block_m": block_m, "block_n": 64, "block_k": 64, "num_warps": 4, "num_stages": 3}
    out = triton_gemv.gemv(x, weight, launch=launch)
    assert relative_error(out, F.linear(x.float(), weight.float())) < 1e-2
    with pytest.raises(ValueError, match=f"at most {block_m} rows"):
        too_many = torch.randn(block_m + 1, k, dtype=torch.bfloat16, device="cuda")
        triton_gemv.gemv(too_many, weight, launch=launch)


def test_gemv_refuses_what_it_cannot_take() -> None:
    weight = torch.randn(64, 32, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="at most 16 rows"):
        triton_gemv.gemv(torch.randn(17, 32, dtype=torch.bfloat16, device="cuda"), weight)
    with pytest.raises(ValueError, match="does not fit"):
        triton_gemv.gemv(torch.randn(2, 33, dtype=torch.bfloat16, device="cuda"), weight)


def test_engine_linear_takes_the_kernel_for_few_rows_only(tiny_model_dir) -> None:
    from engine.models.layers import SkinnyMatmul
    from engine.skinny import use_skinny_matmuls
    from engine.weights import load_model

    model = load_model(tiny_model_dir("llama"), dtype=torch.bfloat16, device="cuda").model
    chosen = use_skinny_matmuls(model)  # whatever was measured faster on this card
    assert {name.split(" ")[0] for name in chosen} <= {
        "qkv_proj",
        "o_proj",
        "gate_up_proj",
        "down_proj",
        "lm_head",
    }
    calls: list[int] = []

    def counting(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, silu: bool) -> torch.Tensor:
        calls.append(x.shape[0])
        return triton_gemv.gemv(x, w, b, silu)

    layer = model.model.layers[0].self_attn.o_proj
    layer.skinny = SkinnyMatmul(counting, 16)
    for rows in (1, 16, 17):
        x = torch.randn(rows, layer.in_features, dtype=torch.bfloat16, device="cuda")
        assert relative_error(layer(x), F.linear(x.float(), layer.weight.float())) < 1e-2
    assert calls == [1, 16]  # 17 rows went to cuBLAS
