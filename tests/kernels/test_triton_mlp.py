"""The fused MLP kernel against its torch contract (kernels/matmul_ref.py fused_mlp_ref)."""

from __future__ import annotations

import pytest
import torch

from kernels.matmul_ref import fused_mlp_ref, row_stats_buffer, write_row_stats
from testkit.numerics import relative_error

pytestmark = pytest.mark.gpu
triton_mlp = pytest.importorskip("kernels.triton_mlp")


def mlp_inputs(rows: int, hidden: int, intermediate: int, dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    on = {"device": "cuda", "dtype": dtype, "generator": generator}
    x = torch.randn(rows, hidden, **on)
    gate_up = torch.randn(2 * intermediate, hidden, **on) * hidden**-0.5
    down = torch.randn(hidden, intermediate, **on) * intermediate**-0.5
    stats = row_stats_buffer(hidden, 16, "cuda")
    write_row_stats(x, stats)
    return x, gate_up, down, stats


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize(
    "hidden, intermediate", [(4096, 14336), (1536, 8960), (64, 300), (100, 72), (33, 1000)]
)
@pytest.mark.parametrize("columns", [128, 112, 48])
def test_fused_mlp_matches_the_two_matmuls(
    dtype: torch.dtype, rows: int, hidden: int, intermediate: int, columns: int
) -> None:
    x, gate_up, down, stats = mlp_inputs(rows, hidden, intermediate, dtype)
    want_stats = stats.clone()
    want = fused_mlp_ref(x, gate_up, down, want_stats, 1e-5)
    out = triton_mlp.fused_mlp(x, gate_up, down, stats, 1e-5, columns=columns)
    assert out.shape == x.shape and out.dtype == dtype
    assert relative_error(out, want) < 1e-2
    # The statistics left for the next norm are those of the rounded output.
    groups = -(-hidden // 32)
    torch.testing.assert_close(stats[:groups, :rows], want_stats[:groups, :rows], rtol=2e-2, atol=1e-3)


def test_fused_mlp_gives_the_same_bits_every_call() -> None:
    # Partial products are added in a fixed order (no atomics): greedy decoding stays
    # reproducible whatever order the programs finish in.
    x, gate_up, down, stats = mlp_inputs(2, 4096, 14336, torch.bfloat16, seed=3)
    saved = stats.clone()
    first = triton_mlp.fused_mlp(x, gate_up, down, stats, 1e-5)
    first_stats = stats.clone()
    for _ in range(10):
        stats.copy_(saved)
        assert torch.equal(triton_mlp.fused_mlp(x, gate_up, down, stats, 1e-5), first)
        assert torch.equal(stats, first_stats)


def test_fused_mlp_takes_no_rows_and_refuses_what_it_cannot_take() -> None:
    x, gate_up, down, stats = mlp_inputs(0, 64, 300, torch.bfloat16)
    assert triton_mlp.fused_mlp(x, gate_up, down, stats, 1e-5).shape == (0, 64)
    x = torch.randn(17, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="at most 16 rows"):
        triton_mlp.fused_mlp(x, gate_up, down, stats, 1e-5)
    with pytest.raises(ValueError, match="do not make an MLP"):
        triton_mlp.fused_mlp(x[:1], gate_up, down.T.contiguous(), stats, 1e-5)
    with pytest.raises(ValueError, match="multiple of 16"):
        triton_mlp.fused_mlp(x[:1], gate_up, down, stats, 1e-5, columns=40)
