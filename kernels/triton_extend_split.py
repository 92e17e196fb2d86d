"""Split-KV extend attention: short chunks over long cached contexts (flash-decoding for extend).

The unsplit extend kernel gives each (q-tile, KV head) one program that walks every key of its
sequence. A chunk of 128 new tokens on an 8K prefix is then 4 q-tiles x 8 KV heads = 32 busy
programs on 132 multiprocessors, each walking 8K keys. Here the key range of every q-tile is
cut into splits: grid (q-tiles, KV heads, splits). Each program runs the online softmax over its
own keys (the causal mask where the range reaches the diagonal) and writes a partial result,
normalised, in the query's dtype, with its log2-sum-exp in float32; a second kernel combines
the splits of every (token, head).

Launch sizes come from host sizes only (num_tokens, num_seqs, KV heads, max_seq_len, the SM
count), so a CUDA graph can capture the launch; each q-tile cuts its own key range, read on the
device, into that many splits of whole BLOCK_N tiles (at least MIN_SPLIT_KEYS each), so a graph
captured for the longest allowed context spreads a short sequence over fewer splits instead of
leaving it in one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.extend_split_launch import (
    MAX_SPLITS,
    MIN_SPLIT_KEYS,
    SPLIT_UNROLL,
    choose_extend_splits,
    split_launch,
    split_tiles,
)
from kernels.triton_common import LOG2E, check_attention_shapes, dot_precision, next_power_of_two, num_sms
from kernels.triton_extend import (
    EXTEND_UNROLL,
    _attend,
    _find_sequence,
    extend_attention_triton,
    extend_tiles,
    unroll_that_fits,
)
from kernels.triton_pdl import pdl_prologue, use_pdl

# Partial values (heads x splits x head_dim) one reduce program combines.
REDUCE_ELEMENTS = 8192


@triton.jit
def _split_keys(kv_end, num_splits, BLOCK_N: tl.constexpr, MIN_KEYS: tl.constexpr):
    """Keys per split of one q-tile whose keys are 0..kv_end: whole tiles, at least MIN_KEYS."""
    keys = tl.cdiv(tl.cdiv(kv_end, num_splits), BLOCK_N) * BLOCK_N
    return tl.maximum(keys, MIN_KEYS)


# Split and sequence counts vary from call to call: one compiled kernel for all of them.
@triton.jit(do_not_specialize=["stride_table", "num_seqs", "num_heads", "num_splits"])
def _extend_split_kernel(
    query_ptr,
    cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_ptr,
    partial_out_ptr,
    partial_lse_ptr,
    scale_log2,
    stride_query_token,
    stride_query_head,
    stride_cache_kv,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    stride_table,
    num_seqs,
    num_heads,
    num_splits,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MIN_KEYS: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
    UNROLL: tl.constexpr,
):
    pdl_prologue(USE_PDL)
    q_tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
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
    flat_token = (query_begin + token).to(tl.int64)
    index = (flat_token * num_heads + heads) * num_splits + split

    # This q-tile sees keys 0..kv_end; its own length decides how many splits it uses.
    kv_end = tl.minimum(seq_len, context_len + first + BLOCK_Q)
    split_keys = _split_keys(kv_end, num_splits, BLOCK_N, MIN_KEYS)
    start = split * split_keys
    if start >= kv_end:
        # An unused split: the reduce gives it zero weight.
        tl.store(partial_lse_ptr + index, tl.full([BLOCK_M], float("-inf"), tl.float32), mask=row_valid)
        return
    end = tl.minimum(start + split_keys, kv_end)

    query_pos = context_len + tl.minimum(token, query_len - 1)
    dims = tl.arange(0, HEAD_DIM)
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
    # Split bounds, unmasked_end and kv_end's tile start are all multiples of BLOCK_N, so no
    # tile straddles two splits or the masked/unmasked boundary.
    unmasked_end = (context_len + first) // BLOCK_N * BLOCK_N
    masked_start = tl.maximum(start, unmasked_end)
    acc, row_max, row_sum = _attend(
        acc,
        row_max,
        row_sum,
        query,
        query_pos,
        table,
        key_base,
        value_base,
        start,
        tl.minimum(end, unmasked_end),
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
    # A row can see none of this split's keys (the split lies past its position): SAFE_MAX
    # keeps its partial at zero weight instead of NaN.
    acc, row_max, row_sum = _attend(
        acc,
        row_max,
        row_sum,
        query,
        query_pos,
        table,
        key_base,
        value_base,
        masked_start,
        end,
        kv_end,
        scale_log2,
        stride_cache_block,
        stride_cache_slot,
        dims,
        BLOCK_SIZE,
        BLOCK_N,
        True,
        True,
        PRECISION,
    )

    seen = row_sum > 0.0
    lse = tl.where(seen, row_max + tl.math.log2(tl.where(seen, row_sum, 1.0)), float("-inf"))
    out = acc / tl.where(seen, row_sum, 1.0)[:, None]
    tl.store(
        partial_out_ptr + index[:, None] * HEAD_DIM + dims[None, :],
        out.to(partial_out_ptr.dtype.element_ty),
        mask=row_valid[:, None],
    )
    tl.store(partial_lse_ptr + index, lse, mask=row_valid)


@triton.jit(do_not_specialize=["num_heads", "num_splits"])
def _extend_reduce_kernel(
    partial_out_ptr,
    partial_lse_ptr,
    out_ptr,
    stride_out_token,
    stride_out_head,
    num_heads,
    num_splits,
    HEAD_DIM: tl.constexpr,
    HEADS_BLOCK: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """One program per (token, HEADS_BLOCK heads), every split in one load: a program per
    (token, head) made a graph launch's reduce cost more than its attention (8,192 programs
    of two dependent loads), and a loop over the splits serialised 32 of them."""
    pdl_prologue(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * HEADS_BLOCK + tl.arange(0, HEADS_BLOCK)
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, HEAD_DIM)
    head_valid = heads < num_heads
    index = (token * num_heads + heads[:, None]) * num_splits + splits[None, :]  # [heads, splits]
    valid = head_valid[:, None] & (splits[None, :] < num_splits)
    # Every split of a token's q-tile wrote its lse (-inf when unused or when it saw no key);
    # split 0 holds key 0, which every row sees, so each head's maximum is finite.
    lse = tl.load(partial_lse_ptr + index, mask=valid, other=float("-inf"))
    seen = lse > float("-inf")
    lse_max = tl.where(head_valid, tl.max(lse, 1), 0.0)
    weight = tl.where(seen, tl.math.exp2(lse - lse_max[:, None]), 0.0)
    part = tl.load(
        partial_out_ptr + index[:, :, None] * HEAD_DIM + dims[None, None, :],
        mask=seen[:, :, None],
        other=0.0,
    )
    out = tl.sum(part.to(tl.float32) * weight[:, :, None], 1)
    out = out / tl.where(head_valid, tl.sum(weight, 1), 1.0)[:, None]
    tl.store(
        out_ptr + token * stride_out_token + heads[:, None] * stride_out_head + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=head_valid[:, None],
    )


def extend_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    num_seqs: int,
    scale: float,
    out: torch.Tensor | None = None,
    max_query_len: int = 0,
    max_seq_len: int = 0,
    num_splits: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_stages: int | None = None,
    num_warps: int | None = None,
    unroll: int | None = None,
) -> torch.Tensor:
    """extend_attention_triton's contract, with the key range split across programs when the
    q-tiles are too few to fill the GPU. max_seq_len (the host's copy, 0 if unknown: no split)
    and max_query_len size the launch. num_splits forces a split count, block_m a narrower
    split tile, block_n / num_stages / num_warps the split kernel's key tile and pipeline
    (tests, benchmarks: `python -m kernels.bench_attention --tune`), unroll the key loop's
    copies in both kernels."""
    num_heads, num_kv_heads, head_dim, block_size = check_attention_shapes(query, kv_cache)
    num_tokens = query.shape[0]
    group = num_heads // num_kv_heads
    if block_m is None:
        tiles, stages = split_launch(group, head_dim, query.dtype, max_query_len, query.device)
    else:
        tiles, stages = split_tiles(group, head_dim, query.dtype, max_query_len, block_m), 2
    group_pad, block_q, block_m, tile_n, tile_warps = tiles
    block_n = block_n or tile_n
    num_warps = num_warps or tile_warps
    num_stages = num_stages or stages
    if num_splits is None:
        _, unsplit_q, unsplit_m, _, _ = extend_tiles(group, head_dim, query.dtype, max_query_len)
        splits = choose_extend_splits(
            num_tokens,
            num_seqs,
            num_kv_heads,
            max_seq_len,
            num_sms(query.device),
            (unsplit_q, unsplit_m),
            (block_q, block_m),
        )
    else:
        splits = max(1, min(num_splits, MAX_SPLITS))
    if splits == 1 or num_tokens == 0 or num_seqs == 0:
        return extend_attention_triton(
            query, kv_cache, block_tables, seq_lens, query_start_loc, num_seqs, scale, out, max_query_len,
            EXTEND_UNROLL if unroll is None else unroll,
        )  # fmt: skip
    if out is None:
        out = torch.empty_like(query, memory_format=torch.contiguous_format)
    rows = num_tokens * num_heads * splits
    # Partials in the query's dtype (normalised, so no wider range than the output): half the
    # bytes of float32 for bf16/fp16; float32 inputs keep float32.
    partial_out = torch.empty((rows, head_dim), dtype=query.dtype, device=query.device)
    partial_lse = torch.empty((rows,), dtype=torch.float32, device=query.device)
    pdl = use_pdl(query.device)
    split_unroll = SPLIT_UNROLL if unroll is None else unroll
    split_unroll = unroll_that_fits(
        split_unroll, num_stages, block_m, block_n, head_dim, query.dtype, query.device
    )
    _extend_split_kernel[(num_tokens // block_q + num_seqs, num_kv_heads, splits)](
        query,
        kv_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        partial_out,
        partial_lse,
        scale * LOG2E,
        query.stride(0),
        query.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        block_tables.stride(0),
        num_seqs,
        num_heads,
        splits,
        GROUP=group,
        GROUP_PAD=group_pad,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        MIN_KEYS=MIN_SPLIT_KEYS,
        PRECISION=dot_precision(query.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
        USE_PDL=pdl,
        UNROLL=split_unroll,
        launch_pdl=pdl,
    )
    # About REDUCE_ELEMENTS partial values per program: many heads when splits are few.
    splits_pad = max(2, next_power_of_two(splits))
    heads_block = max(1, min(next_power_of_two(num_heads), REDUCE_ELEMENTS // (splits_pad * head_dim)))
    _extend_reduce_kernel[(num_tokens, triton.cdiv(num_heads, heads_block))](
        partial_out,
        partial_lse,
        out,
        out.stride(0),
        out.stride(1),
        num_heads,
        splits,
        HEAD_DIM=head_dim,
        HEADS_BLOCK=heads_block,
        SPLITS_PAD=splits_pad,
        num_warps=4,
        USE_PDL=pdl,
        launch_pdl=pdl,
    )
    return out
