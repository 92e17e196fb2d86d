"""Triton extend (chunked prefill) attention over a paged cache.

Each sequence brings q new tokens on top of seq_len - q cached ones; the store kernel has
already written the new tokens' K/V, so every key is read through the block table and the
causal mask is key_pos <= query_pos with query_pos = seq_len - q + j.

Tiling: a program owns BLOCK_Q consecutive new tokens of one sequence times all query heads
of one KV head (the group, padded to a power of two): BLOCK_M = BLOCK_Q * GROUP_PAD rows,
row r = (token r // GROUP_PAD, head r % GROUP_PAD). Each K/V tile is then read once per KV
head and q-tile, and a decode row (q = 1) mixed into the batch still puts its whole group
through one tl.dot. Flash-attention style: BLOCK_N keys per step with an online softmax.

The grid is flat over q-tiles of the whole batch, T // BLOCK_Q + B of them, so a batch of
many decodes and one long chunk launches no empty programs per (sequence, tile) pair; a
program finds its sequence by binary search over query_start_loc (as vLLM's unified
attention does).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.triton_common import (
    LOG2E,
    check_attention_shapes,
    dot_precision,
    next_power_of_two,
    shared_memory_per_program,
)
from kernels.triton_pdl import pdl_prologue, use_pdl


@triton.jit
def _find_sequence(query_start_ptr, q_tile, num_seqs, BLOCK_Q: tl.constexpr):
    # Sequence i's tiles start at query_start[i] // BLOCK_Q + i: the last i whose start <= q_tile.
    low = 0
    high = num_seqs
    while low < high:
        mid = (low + high) // 2
        first_tile = tl.load(query_start_ptr + mid) // BLOCK_Q + mid
        if first_tile <= q_tile:
            low = mid + 1
        else:
            high = mid
    return low - 1


@triton.jit
def _attend(
    acc,
    row_max,
    row_sum,
    query,
    query_pos,
    table,
    key_base,
    value_base,
    start,
    stop,
    kv_end,
    scale_log2,
    stride_cache_block,
    stride_cache_slot,
    dims,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    SAFE_MAX: tl.constexpr,
    PRECISION: tl.constexpr,
    UNROLL: tl.constexpr = 1,
):
    """Online softmax over keys start..stop (tiles of BLOCK_N); MASKED adds the bounds check
    and the causal mask, which the tiles below every row's position do not need. SAFE_MAX
    keeps a row that has seen no key yet at zero (a key range that starts past some rows'
    positions, as a split can); without it such a row would turn NaN. UNROLL copies of the
    loop body let the compiler run one tile's softmax beside the next tile's matmuls."""
    for tile in tl.range(start, stop, BLOCK_N, loop_unroll_factor=UNROLL):
        pos = tile + tl.arange(0, BLOCK_N)
        if MASKED:
            valid = pos < kv_end
            block = tl.load(table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        else:
            block = tl.load(table + pos // BLOCK_SIZE).to(tl.int64)
        offsets = block * stride_cache_block + (pos % BLOCK_SIZE) * stride_cache_slot
        if MASKED:
            key = tl.load(key_base + offsets[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
        else:
            key = tl.load(key_base + offsets[:, None] + dims[None, :])
        scores = tl.dot(query, tl.trans(key.to(query.dtype)), input_precision=PRECISION) * scale_log2
        if MASKED:
            # pos <= query_pos < kv_end also keeps every used key inside the masked load.
            scores = tl.where(pos[None, :] <= query_pos[:, None], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        shift = new_max
        if SAFE_MAX:
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        probs = tl.math.exp2(scores - shift[:, None])
        alpha = tl.math.exp2(row_max - shift)
        row_sum = row_sum * alpha + tl.sum(probs, 1)
        if MASKED:
            value = tl.load(value_base + offsets[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
        else:
            value = tl.load(value_base + offsets[:, None] + dims[None, :])
        value = value.to(query.dtype)
        acc = acc * alpha[:, None] + tl.dot(probs.to(value.dtype), value, input_precision=PRECISION)
        row_max = new_max
    return acc, row_max, row_sum


# Integers that change from batch to batch are not specialised on (Triton compiles a variant per
# "== 1" and "divisible by 16" of each int argument): a served eager step meeting a new variant
# stalled ~1-1.6 s for the compile (bench.step_fit on a 2-GPU run's step logs).
@triton.jit(do_not_specialize=["stride_table", "num_seqs"])
def _extend_kernel(
    query_ptr,
    cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_ptr,
    out_ptr,
    scale_log2,
    stride_query_token,
    stride_query_head,
    stride_out_token,
    stride_out_head,
    stride_cache_kv,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    stride_table,
    num_seqs,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
    UNROLL: tl.constexpr,
):
    pdl_prologue(USE_PDL)
    q_tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_sequence(query_start_ptr, q_tile, num_seqs, BLOCK_Q)
    query_begin = tl.load(query_start_ptr + seq)
    query_len = tl.load(query_start_ptr + seq + 1) - query_begin
    first = (q_tile - (query_begin // BLOCK_Q + seq)) * BLOCK_Q
    if first >= query_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - query_len

    rows = tl.arange(0, BLOCK_M)
    token = first + rows // GROUP_PAD
    group_row = rows % GROUP_PAD
    row_valid = (token < query_len) & (group_row < GROUP)
    heads = kv_head * GROUP + group_row
    # Padding rows act as the tile's last real token: their scores stay finite (no NaN from an
    # all-masked row) and they are never stored.
    query_pos = context_len + tl.minimum(token, query_len - 1)
    dims = tl.arange(0, HEAD_DIM)
    flat_token = (query_begin + token).to(tl.int64)
    query = tl.load(
        query_ptr
        + flat_token[:, None] * stride_query_token
        + heads[:, None] * stride_query_head
        + dims[None, :],
        mask=row_valid[:, None],
        other=0.0,
    )

    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_table
    key_base = cache_ptr + kv_head * stride_cache_head
    value_base = key_base + stride_cache_kv
    # Keys before the tile's first query position are seen by every row: whole tiles of them
    # run without masks. The rest, up to the tile's last query position, run masked.
    kv_end = tl.minimum(seq_len, context_len + first + BLOCK_Q)
    unmasked_end = (context_len + first) // BLOCK_N * BLOCK_N
    acc, row_max, row_sum = _attend(
        acc,
        row_max,
        row_sum,
        query,
        query_pos,
        table,
        key_base,
        value_base,
        0,
        unmasked_end,
        kv_end,
        scale_log2,
        stride_cache_block,
        stride_cache_slot,
        dims,
        BLOCK_SIZE,
        BLOCK_N,
        False,
        False,
        PRECISION,
        UNROLL,
    )
    acc, row_max, row_sum = _attend(
        acc,
        row_max,
        row_sum,
        query,
        query_pos,
        table,
        key_base,
        value_base,
        unmasked_end,
        kv_end,
        kv_end,
        scale_log2,
        stride_cache_block,
        stride_cache_slot,
        dims,
        BLOCK_SIZE,
        BLOCK_N,
        True,
        False,
        PRECISION,
    )

    out = acc / row_sum[:, None]
    tl.store(
        out_ptr + flat_token[:, None] * stride_out_token + heads[:, None] * stride_out_head + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None],
    )


def extend_tiles(
    group: int, head_dim: int, dtype: torch.dtype, max_query_len: int
) -> tuple[int, int, int, int, int]:
    """(GROUP_PAD, BLOCK_Q, BLOCK_M, BLOCK_N, num_warps) for a batch's shape.

    One warpgroup (4 warps) per 64 rows, so each wgmma spans the whole tile width. Batches with
    long chunks take 128-row tiles (twice the reuse of each K/V tile); batches of short chunks
    and decodes keep 64 rows, wasting less on padding rows.
    """
    group_pad = next_power_of_two(group)
    wide = max_query_len * group_pad >= 256 and head_dim <= 128 and dtype != torch.float32
    block_m = max(128 if wide else 64, group_pad)
    block_n = 64 if head_dim <= 128 and dtype != torch.float32 else 32
    return group_pad, block_m // group_pad, block_m, block_n, max(4, block_m // 16)


# Copies of the key loop's body (loop_unroll_factor): with two, 512 new tokens over 8,192
# cached ran in 230 us against 276 us a layer on an H200 (kernels/NOTES.md, v13).
EXTEND_UNROLL = 2
EXTEND_STAGES = 2


@functools.cache  # on the host path of every eager or piecewise step's attention call
def unroll_that_fits(
    unroll: int,
    stages: int,
    block_m: int,
    block_n: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> int:
    """`unroll`, or 1 where its copies of the pipeline's K/V buffers (each body copy gets its
    own) and the query tile would not fit one program's shared memory."""
    need = (unroll * stages * 2 * block_n + block_m) * head_dim * dtype.itemsize
    return unroll if need <= shared_memory_per_program(device) else 1


def extend_attention_triton(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    num_seqs: int,
    scale: float,
    out: torch.Tensor | None = None,
    max_query_len: int = 0,
    unroll: int = EXTEND_UNROLL,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens (query [T, heads, head_dim]) over its
    whole paged context; the new tokens' K/V must already be in the cache. max_query_len (the
    host's copy, 0 if unknown) picks the tile shape; `unroll` the key loop's copies (benches)."""
    num_heads, num_kv_heads, head_dim, block_size = check_attention_shapes(query, kv_cache)
    num_tokens = query.shape[0]
    if out is None:
        out = torch.empty_like(query, memory_format=torch.contiguous_format)
    if num_tokens == 0 or num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    group_pad, block_q, block_m, block_n, num_warps = extend_tiles(
        group, head_dim, query.dtype, max_query_len
    )
    grid = (num_tokens // block_q + num_seqs, num_kv_heads)
    pdl = use_pdl(query.device)
    unroll = unroll_that_fits(unroll, EXTEND_STAGES, block_m, block_n, head_dim, query.dtype, query.device)
    _extend_kernel[grid](
        query,
        kv_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        out,
        scale * LOG2E,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        block_tables.stride(0),
        num_seqs,
        GROUP=group,
        GROUP_PAD=group_pad,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        PRECISION=dot_precision(query.dtype),
        num_warps=num_warps,
        num_stages=EXTEND_STAGES,
        USE_PDL=pdl,
        UNROLL=unroll,
        launch_pdl=pdl,
    )
    return out
