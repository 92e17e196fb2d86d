"""The qkv projection of a few rows with rotary and the KV store in its epilogue: one launch for three.

At batch 1 a decode layer launched the qkv GEMV, then a rotary kernel and a KV-store kernel of
~1.5-2.5 us each on a few KiB. Here each program of the GEMV (kernels/triton_gemv.py's loop)
owns a part (a quarter by default) of one head's dimensions from each half, the two halves
rotary pairs with each other, so the epilogue rotates its own tile: a query head's tile goes
to the query output, a key head's (rotated) and a value head's tile go straight into the
paged cache at the rows' slots (a negative slot, a padding row, stores nothing). The same
roundings as the three separate kernels: the projection rounded to the activation dtype, each
rotary product and sum rounded as kernels/elementwise_ref.py's rotary_ref.

With `norm_stats` the projection is of rmsnorm(x) with a unit weight, folded in as in
kernels/triton_gemv.py (the partial sums of squares the kernel that wrote x left, the
accumulator scaled at the end).

Not for models with q/k norms (Qwen3: the norm sits between projection and rotary).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from kernels.triton_gemv import GEMV_MAX_ROWS, check_row_stats, load_row_stats, norm_partials
from kernels.triton_pdl import pdl_prologue, use_pdl


@triton.jit(do_not_specialize=["M"])
def _qkv_rotary_store_kernel(
    x_ptr, w_ptr, bias_ptr, stats_ptr, positions_ptr, cos_ptr, sin_ptr, q_ptr, cache_ptr, slot_ptr,
    M, K, stride_xm, stride_wn, stride_qm, stride_c,
    stride_cache_kv, stride_cache_block, stride_cache_slot, stride_cache_head, norm_eps,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr, NORM: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr,
    PARTIALS: tl.constexpr, PARTS: tl.constexpr,
):  # fmt: skip
    pdl_prologue(USE_PDL)
    HALF: tl.constexpr = HEAD_DIM // 2
    PART: tl.constexpr = HALF // PARTS  # dimensions of each half a program owns
    head = tl.program_id(0) // PARTS
    part = tl.program_id(0) % PARTS
    rows = tl.arange(0, 16)
    row_ok = rows < M
    # Tile column i: dimension part * PART + i % PART of the first half (i < PART) or of the
    # second half: the two halves of the tile are rotary pairs.
    i = tl.arange(0, 2 * PART)
    dims_in_head = (i // PART) * HALF + part * PART + i % PART
    w_rows = w_ptr + (head * HEAD_DIM + dims_in_head)[:, None].to(tl.int64) * stride_wn
    dtype = q_ptr.dtype.element_ty
    if NORM:
        sum_squares = load_row_stats(stats_ptr, rows, row_ok, K, 16, PARTIALS)
    acc = tl.zeros((16, 2 * PART), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
        )
        w = tl.load(w_rows + ks[None, :], mask=k_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    if NORM:
        acc = acc * tl.rsqrt(sum_squares / K + norm_eps)[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + head * HEAD_DIM + dims_in_head).to(tl.float32)[None, :]
    projected = acc.to(dtype).to(tl.float32)  # the projection's output, as the GEMV rounds it
    first, second = tl.split(tl.permute(tl.reshape(projected, (16, 2, PART)), (0, 2, 1)))
    dims = part * PART + tl.arange(0, PART)  # rotary dimensions, within a half
    if head < NUM_HEADS + NUM_KV_HEADS:  # a query or key head: rotate
        positions = tl.load(positions_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        table = positions[:, None] * stride_c + dims[None, :]
        cos = tl.load(cos_ptr + table, mask=row_ok[:, None], other=0.0).to(dtype).to(tl.float32)
        sin = tl.load(sin_ptr + table, mask=row_ok[:, None], other=0.0).to(dtype).to(tl.float32)
        rotated_first = (first * cos).to(dtype).to(tl.float32) + (-second * sin).to(dtype).to(tl.float32)
        rotated_second = (second * cos).to(dtype).to(tl.float32) + (first * sin).to(dtype).to(tl.float32)
        first, second = rotated_first, rotated_second
    if head < NUM_HEADS:
        out = q_ptr + rows[:, None] * stride_qm + head * HEAD_DIM + dims[None, :]
        tl.store(out, first.to(dtype), mask=row_ok[:, None])
        tl.store(out + HALF, second.to(dtype), mask=row_ok[:, None])
    else:
        slots = tl.load(slot_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
        is_value = head >= NUM_HEADS + NUM_KV_HEADS
        kv_head = head - NUM_HEADS - is_value.to(tl.int32) * NUM_KV_HEADS
        base = (
            cache_ptr
            + is_value.to(tl.int64) * stride_cache_kv
            + (slots // BLOCK_SIZE) * stride_cache_block
            + (slots % BLOCK_SIZE) * stride_cache_slot
            + kv_head * stride_cache_head
        )
        out = base[:, None] + dims[None, :]
        keep = (slots >= 0)[:, None]
        cache_dtype = cache_ptr.dtype.element_ty
        tl.store(out, first.to(dtype).to(cache_dtype), mask=keep)
        tl.store(out + HALF, second.to(dtype).to(cache_dtype), mask=keep)


def qkv_rotary_store(
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
    parts: int = 2,
    block_k: int | None = None,
) -> torch.Tensor:
    """The rotated query [M, heads, head_dim] of x [M, K] @ weight^T (+ bias), M <= 16; the
    rotated keys and the values are written into kv_cache [2, blocks, block_size, kv_heads,
    head_dim] at slot_mapping. cos/sin are the float32 [positions, head_dim] tables. With
    `norm_stats` (kernels/triton_gemv.py), rmsnorm(x) with a unit weight takes x's place."""
    rows, k = x.shape
    _, _, block_size, cache_heads, head_dim = kv_cache.shape
    n = (num_heads + 2 * num_kv_heads) * head_dim
    if rows > GEMV_MAX_ROWS:
        raise ValueError(f"qkv_rotary_store takes at most {GEMV_MAX_ROWS} rows, got {rows}")
    if weight.shape != (n, k) or weight.stride(1) != 1 or cache_heads != num_kv_heads:
        raise ValueError(f"weight {tuple(weight.shape)} and cache {tuple(kv_cache.shape)} do not fit")
    if head_dim % 64 or kv_cache.stride(-1) != 1:
        raise ValueError("head_dim must be a multiple of 64, innermost and contiguous in the cache")
    if parts not in (2, 4, 8) or head_dim // parts < 16:
        raise ValueError(f"parts must be 2, 4 or 8 with a tile of at least 16 columns, got {parts}")
    if norm_stats is not None:
        check_row_stats(norm_stats, k, GEMV_MAX_ROWS)
    if x.stride(1) != 1:
        x = x.contiguous()
    query = torch.empty((rows, num_heads, head_dim), dtype=x.dtype, device=x.device)
    if rows:
        pdl = use_pdl(x.device)
        # A tile is half a head's rows: ~32K weight elements a stage keeps three stages in
        # shared memory for any head size.
        block_k = block_k or max(16, 16384 // (head_dim // 2))
        bias_or_any = bias if bias is not None else weight
        _qkv_rotary_store_kernel[(parts * (num_heads + 2 * num_kv_heads),)](
            x, weight, bias_or_any, norm_stats if norm_stats is not None else query,
            positions, cos, sin, query, kv_cache, slot_mapping,
            rows, k, x.stride(0), weight.stride(0), query.stride(0), cos.stride(0),
            kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
            norm_eps,
            NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
            HAS_BIAS=bias is not None, NORM=norm_stats is not None, BLOCK_K=block_k, USE_PDL=pdl,
            PARTIALS=norm_partials(norm_stats, k), PARTS=parts,
            num_warps=4, num_stages=3, launch_pdl=pdl,
        )  # fmt: skip
    return query


def fastest_qkv(
    weights: list[torch.Tensor],
    bias: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> str:
    """At one row, over these weights (several layers' copies, read in turn), which is fastest:
    "fused" or "fused_fine" (this kernel, qkv_kernel says how each cuts the heads), or the
    projection by "cublas" or "gemv" followed by the rotary and KV-store kernels."""
    import torch.nn.functional as F

    from kernels.triton_elementwise import rotary_triton
    from kernels.triton_gemv import fastest_of, gemv
    from kernels.triton_store import store_kv_triton

    n, k = weights[0].shape
    device, dtype = weights[0].device, weights[0].dtype
    head_dim = n // (num_heads + 2 * num_kv_heads)
    x = torch.randn(1, k, device=device, dtype=dtype)
    positions = torch.tensor([7], device=device)
    slots = torch.tensor([5], device=device)
    cache = torch.zeros((2, 2, 16, num_kv_heads, head_dim), device=device, dtype=dtype)
    sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]

    def separate(project: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], None]:
        def run(weight: torch.Tensor) -> None:
            q, key, value = project(weight).split(sizes, dim=-1)
            q, key = rotary_triton(
                positions, q.view(1, num_heads, head_dim), key.view(1, num_kv_heads, head_dim), cos, sin
            )
            store_kv_triton(key, value.view(1, num_kv_heads, head_dim), cache, slots)

        return run

    candidates: dict[str, Callable[[torch.Tensor], object]] = {
        "cublas": separate(lambda weight: F.linear(x, weight, bias)),
        "gemv": separate(lambda weight: gemv(x, weight, bias)),
    }

    def fused(kernel: Callable[..., torch.Tensor]) -> Callable[[torch.Tensor], object]:
        return lambda weight: kernel(
            x, weight, bias, positions, cos, sin, cache, slots, num_heads, num_kv_heads
        )

    for name in ("fused", "fused_fine") if finest_parts(head_dim) > 2 else ("fused",):
        candidates[name] = fused(qkv_kernel(name, head_dim))
    return fastest_of(candidates, weights)


def finest_parts(head_dim: int) -> int:
    """The most parts a head's halves can be cut in (a tile keeps at least 16 columns)."""
    return max(parts for parts in (2, 4, 8) if head_dim // parts >= 16)


def qkv_kernel(name: str, head_dim: int) -> Callable[..., torch.Tensor]:
    """The qkv_rotary_store variant fastest_qkv named: "fused" (each program half a head's
    dimensions) or "fused_fine" (the finest cut, 512-wide K steps). On an H200 the fine cut
    took a Qwen2.5-1.5B-shaped qkv (16 heads: 32 programs for 132 SMs) from 5.9 to 4.9 us and
    left Llama-3.1-8B's (48 heads) at 15.4 against 17.0 (kernels/bench_qkv.py)."""
    if name == "fused":
        return qkv_rotary_store
    if name == "fused_fine":
        return functools.partial(qkv_rotary_store, parts=finest_parts(head_dim), block_k=512)
    raise ValueError(f"no qkv kernel named {name!r}")
