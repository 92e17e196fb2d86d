"""The qkv projection with rotary and the KV store in its epilogue (kernels/triton_qkv.py) against
the three steps it replaces: F.linear rounded to the activation dtype, rotary_ref, store_kv."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.attention_ref import store_kv
from kernels.elementwise_ref import rotary_ref
from kernels.matmul_ref import row_stats_buffer, write_row_stats
from testkit.numerics import DEVICE, fresh_generator

pytestmark = pytest.mark.gpu
triton_qkv = pytest.importorskip("kernels.triton_qkv")


def rotary_tables(head_dim: int, positions: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (500000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(positions).float(), inv_freq)
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos(), emb.sin()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 2, 7, 16])
@pytest.mark.parametrize(
    "heads, kv_heads, head_dim, hidden",
    [(32, 8, 128, 4096), (8, 8, 64, 576), (12, 2, 128, 1536), (4, 1, 64, 200)],
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_qkv_matches_projection_rotary_and_store(
    dtype: torch.dtype, rows: int, heads: int, kv_heads: int, head_dim: int, hidden: int, with_bias: bool
) -> None:
    check_fused_qkv(dtype, rows, heads, kv_heads, head_dim, hidden, with_bias, None)


# Heads cut finer (each program a quarter or an eighth of each half): more programs for models
# whose heads would leave SMs idle.
@pytest.mark.parametrize("parts", [4, 8])
@pytest.mark.parametrize("rows", [1, 7])
@pytest.mark.parametrize("heads, kv_heads, head_dim, hidden", [(32, 8, 128, 4096), (4, 1, 64, 200)])
def test_fused_qkv_in_finer_parts_matches(
    parts: int, rows: int, heads: int, kv_heads: int, head_dim: int, hidden: int
) -> None:
    if head_dim // parts < 16:
        with pytest.raises(ValueError, match="parts"):
            check_fused_qkv(torch.bfloat16, rows, heads, kv_heads, head_dim, hidden, True, None, parts)
        return
    check_fused_qkv(torch.bfloat16, rows, heads, kv_heads, head_dim, hidden, True, None, parts)
    check_fused_qkv(torch.bfloat16, rows, heads, kv_heads, head_dim, hidden, False, 1e-5, parts)


# rmsnorm(x) folded in, from x's row statistics (engine/models/decoder.py's folded path): fewer
# shapes, as each variant compiles once on a fresh machine.
@pytest.mark.parametrize("rows", [1, 7])
@pytest.mark.parametrize(
    "heads, kv_heads, head_dim, hidden", [(32, 8, 128, 4096), (12, 2, 128, 1536), (4, 1, 64, 200)]
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_qkv_normalises_its_rows_from_their_statistics(
    rows: int, heads: int, kv_heads: int, head_dim: int, hidden: int, with_bias: bool
) -> None:
    check_fused_qkv(torch.bfloat16, rows, heads, kv_heads, head_dim, hidden, with_bias, 1e-5)


def check_fused_qkv(
    dtype: torch.dtype,
    rows: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    hidden: int,
    with_bias: bool,
    norm_eps: float | None,
    parts: int = 2,
) -> None:
    gen, seed = fresh_generator()
    n = (heads + 2 * kv_heads) * head_dim
    x = torch.randn(rows, hidden, generator=gen).to(dtype)
    weight = (torch.randn(n, hidden, generator=gen) * hidden**-0.5).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if with_bias else None
    positions = torch.randint(0, 4096, (rows,), generator=gen)
    slots = torch.randperm(8 * 16, generator=gen)[:rows]
    if rows > 1:
        slots[rows // 2] = -1  # a padding row stores nothing
    cos, sin = rotary_tables(head_dim)
    cache = torch.randn(2, 8, 16, kv_heads, head_dim, generator=gen).to(dtype)
    expected_cache = cache.clone()
    x32 = x.float()
    norm_stats = None
    if norm_eps is not None:  # normalised in float32, not rounded: as the kernel does it
        norm_stats = row_stats_buffer(hidden, 16, "cpu").fill_(5.0)  # stale values past the rows
        write_row_stats(x, norm_stats)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm_eps)
    qkv = F.linear(x32, weight.float(), None if bias is None else bias.float()).to(dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    expected_q, k = rotary_ref(
        positions, q.reshape(rows, heads, head_dim), k.reshape(rows, kv_heads, head_dim), cos, sin
    )
    keep = slots >= 0
    store_kv(k[keep], v.reshape(rows, kv_heads, head_dim)[keep], expected_cache, slots[keep])

    on = {"device": DEVICE}
    cache = cache.to(**on)
    got_q = triton_qkv.qkv_rotary_store(
        x.to(**on), weight.to(**on), None if bias is None else bias.to(**on), positions.to(**on),
        cos.to(**on), sin.to(**on), cache, slots.to(**on), heads, kv_heads,
        None if norm_stats is None else norm_stats.to(**on), norm_eps or 1e-6, parts,
    )  # fmt: skip
    # Only the float32 summation order of the projection differs: at most a rounding step apart.
    tolerance = 2 * torch.finfo(dtype).eps * max(1.0, expected_q.abs().max().item())
    torch.testing.assert_close(
        got_q.cpu().float(), expected_q.float(), rtol=0, atol=tolerance, msg=f"seed {seed}"
    )
    untouched = torch.ones(8 * 16, dtype=torch.bool)
    untouched[slots[keep]] = False
    flat = cache.cpu().view(2, 8 * 16, kv_heads, head_dim)
    expected_flat = expected_cache.view(2, 8 * 16, kv_heads, head_dim)
    assert torch.equal(flat[:, untouched], expected_flat[:, untouched]), (
        f"seed {seed}: a slot not written changed"
    )
    tolerance = 2 * torch.finfo(dtype).eps * max(1.0, expected_flat.abs().max().item())
    torch.testing.assert_close(
        flat.float(), expected_flat.float(), rtol=0, atol=tolerance, msg=f"seed {seed}"
    )


def test_fused_qkv_refuses_what_it_cannot_do() -> None:
    cache = torch.zeros(2, 2, 16, 2, 128, dtype=torch.bfloat16, device=DEVICE)
    x = torch.zeros(17, 64, dtype=torch.bfloat16, device=DEVICE)
    weight = torch.zeros(6 * 128, 64, dtype=torch.bfloat16, device=DEVICE)
    cos, sin = (t.to(DEVICE) for t in rotary_tables(128, 16))
    index = torch.zeros(17, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="at most 16 rows"):
        triton_qkv.qkv_rotary_store(x, weight, None, index, cos, sin, cache, index, 2, 2)
    with pytest.raises(ValueError, match="do not fit"):
        triton_qkv.qkv_rotary_store(x[:1], weight[:-1], None, index[:1], cos, sin, cache, index[:1], 2, 2)


@pytest.mark.parametrize("norm_eps", [None, 1e-6])
def test_torch_reference_of_the_contract_agrees(norm_eps: float | None) -> None:
    # kernels/matmul_ref.py stands in for this kernel in the model's CPU tests.
    from kernels.matmul_ref import qkv_rotary_store_ref
    from testkit.numerics import relative_error

    gen, seed = fresh_generator()
    heads, kv_heads, head_dim, hidden, rows = 4, 2, 64, 256, 3
    n = (heads + 2 * kv_heads) * head_dim
    x = torch.randn(rows, hidden, generator=gen) * 2
    weight = torch.randn(n, hidden, generator=gen) * hidden**-0.5
    bias = torch.randn(n, generator=gen)
    positions = torch.tensor([0, 5, 99])
    slots = torch.tensor([3, -1, 17])
    cos, sin = rotary_tables(head_dim, 128)
    ref_cache = torch.zeros(2, 4, 16, kv_heads, head_dim)
    stats = None
    if norm_eps is not None:
        stats = row_stats_buffer(hidden, 16, "cpu")
        write_row_stats(x.half(), stats)
    want = qkv_rotary_store_ref(
        x.half().float(), weight, bias, positions, cos, sin, ref_cache, slots, heads, kv_heads, stats,
        norm_eps or 1e-6,
    )  # fmt: skip
    on = {"device": DEVICE}
    cache = torch.zeros(2, 4, 16, kv_heads, head_dim, dtype=torch.float16, **on)
    got = triton_qkv.qkv_rotary_store(
        x.half().to(**on), weight.half().to(**on), bias.half().to(**on), positions.to(**on),
        cos.to(**on), sin.to(**on), cache, slots.to(**on), heads, kv_heads,
        None if stats is None else stats.to(**on), norm_eps or 1e-6,
    )  # fmt: skip
    assert relative_error(got.cpu(), want) < 1e-2, f"seed {seed}"
    assert relative_error(cache.cpu(), ref_cache) < 1e-2, f"seed {seed}"
