"""Triton paged decode attention: grouped KV heads and split-KV (flash-decoding).

One program owns (sequence, KV head, split): it loads the query rows of every head that
shares that KV head (the group, padded to at least 16 rows for tl.dot), so each K/V tile is
read once per KV head, not once per query head. Long contexts are cut into splits; each
split writes its unnormalised accumulator with its running max and sum, and a small second
kernel combines the splits. With one split the first kernel writes the output directly and
the second is skipped.

The host fixes the number of splits (from its sizes: batch, KV heads, longest context); each
sequence then divides its own length, read on the device, into that many splits of whole
tiles. So a short sequence next to a long one, or every sequence of a CUDA graph sized for
the longest allowed context, still spreads over the splits instead of leaving them idle.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_common import LOG2E, check_attention_shapes, dot_precision, next_power_of_two, num_sms
from kernels.triton_pdl import pdl_prologue, use_pdl

# One tile: on an H200, b1 ctx512 ran 6.6 us with 8 splits of 64 keys vs 8.0 with 4 of 128.
MIN_SPLIT_TOKENS = 64
MAX_SPLITS = 64
# Programs per multiprocessor the split count aims for: one is too few loads in flight.
PROGRAMS_PER_SM = 2


@triton.jit
def _split_tokens(seq_len, num_splits, BLOCK_N: tl.constexpr):
    """Keys per split of one sequence: its length over the splits, in whole tiles."""
    return tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N


@triton.jit(do_not_specialize=["stride_table", "num_heads", "num_splits"])  # triton_extend.py: why
def _decode_kernel(
    query_ptr,
    cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    out_ptr,
    partial_acc_ptr,
    partial_max_ptr,
    partial_sum_ptr,
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
    num_heads,
    num_splits,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_prologue(USE_PDL)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    split_tokens = _split_tokens(seq_len, num_splits, BLOCK_N)
    start = split * split_tokens
    # A sequence too short for every split leaves the last ones empty; the reduce skips them.
    if start >= seq_len:
        return
    end = tl.minimum(start + split_tokens, seq_len)

    rows = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM)
    row_valid = rows < GROUP
    heads = kv_head * GROUP + rows
    # In a pure decode batch sequence i owns flat token i.
    query = tl.load(
        query_ptr
        + seq.to(tl.int64) * stride_query_token
        + heads[:, None] * stride_query_head
        + dims[None, :],
        mask=row_valid[:, None],
        other=0.0,
    )

    row_max = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_table
    key_base = cache_ptr + kv_head * stride_cache_head
    value_base = key_base + stride_cache_kv
    for tile in range(start, end, BLOCK_N):
        pos = tile + tl.arange(0, BLOCK_N)
        valid = pos < end
        # Masked loads: slots past seq_len hold whatever the pool had (never multiply it by 0).
        block = tl.load(table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        offsets = block * stride_cache_block + (pos % BLOCK_SIZE) * stride_cache_slot
        key = tl.load(key_base + offsets[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
        scores = tl.dot(query, tl.trans(key.to(query.dtype)), input_precision=PRECISION) * scale_log2
        scores = tl.where(valid[None, :], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        probs = tl.math.exp2(scores - new_max[:, None])
        alpha = tl.math.exp2(row_max - new_max)
        row_sum = row_sum * alpha + tl.sum(probs, 1)
        value = tl.load(value_base + offsets[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
        value = value.to(query.dtype)
        acc = acc * alpha[:, None] + tl.dot(probs.to(value.dtype), value, input_precision=PRECISION)
        row_max = new_max

    if SINGLE_SPLIT:
        out = acc / row_sum[:, None]
        tl.store(
            out_ptr + seq.to(tl.int64) * stride_out_token + heads[:, None] * stride_out_head + dims[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_valid[:, None],
        )
    else:
        index = (seq.to(tl.int64) * num_heads + heads) * num_splits + split
        tl.store(partial_acc_ptr + index[:, None] * HEAD_DIM + dims[None, :], acc, mask=row_valid[:, None])
        tl.store(partial_max_ptr + index, row_max, mask=row_valid)
        tl.store(partial_sum_ptr + index, row_sum, mask=row_valid)


@triton.jit(do_not_specialize=["num_heads", "num_splits"])
def _decode_reduce_kernel(
    partial_acc_ptr,
    partial_max_ptr,
    partial_sum_ptr,
    seq_lens_ptr,
    out_ptr,
    stride_out_token,
    stride_out_head,
    num_heads,
    num_splits,
    HEAD_DIM: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_prologue(USE_PDL)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    used = tl.cdiv(seq_len, _split_tokens(seq_len, num_splits, BLOCK_N))
    splits = tl.arange(0, SPLITS_PAD)
    split_valid = splits < used
    dims = tl.arange(0, HEAD_DIM)
    index = (seq.to(tl.int64) * num_heads + head) * num_splits + splits
    part_max = tl.load(partial_max_ptr + index, mask=split_valid, other=float("-inf"))
    part_sum = tl.load(partial_sum_ptr + index, mask=split_valid, other=0.0)
    part_acc = tl.load(
        partial_acc_ptr + index[:, None] * HEAD_DIM + dims[None, :], mask=split_valid[:, None], other=0.0
    )
    total_max = tl.max(part_max, 0)
    weight = tl.math.exp2(part_max - total_max)  # 0 for the masked splits
    weight = tl.where(split_valid, weight, 0.0)
    out = tl.sum(part_acc * weight[:, None], 0) / tl.sum(part_sum * weight, 0)
    tl.store(
        out_ptr + seq.to(tl.int64) * stride_out_token + head * stride_out_head + dims,
        out.to(out_ptr.dtype.element_ty),
    )


def decode_block_n(head_dim: int, dtype: torch.dtype) -> int:
    if head_dim >= 256 or dtype == torch.float32:
        return 32
    return 64


def choose_splits(
    num_seqs: int, num_kv_heads: int, max_seq_len: int, sms: int, block_n: int
) -> tuple[int, int]:
    """(num_splits, split_tokens): enough programs to fill ~PROGRAMS_PER_SM per SM.

    Uses only host sizes (no device sync). split_tokens is a multiple of block_n so that
    every split but the last runs whole tiles.
    """
    programs = max(1, num_seqs * num_kv_heads)
    most = max(1, min(MAX_SPLITS, triton.cdiv(max_seq_len, MIN_SPLIT_TOKENS)))
    splits = max(1, min(most, triton.cdiv(PROGRAMS_PER_SM * sms, programs)))
    return splits_for(max_seq_len, splits, block_n)


def splits_for(max_seq_len: int, splits: int, block_n: int) -> tuple[int, int]:
    split_tokens = triton.cdiv(triton.cdiv(max(1, max_seq_len), splits), block_n) * block_n
    return triton.cdiv(max(1, max_seq_len), split_tokens), split_tokens


def paged_decode_triton(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seq_len: int,
    scale: float,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """One new token per sequence: query [B, heads, head_dim] -> out [B, heads, head_dim].

    max_seq_len is the host's copy of max(seq_lens); it sizes the grid. num_splits overrides
    the heuristic (for benchmarks).
    """
    num_heads, num_kv_heads, head_dim, block_size = check_attention_shapes(query, kv_cache)
    num_seqs = query.shape[0]
    if out is None:
        out = torch.empty_like(query, memory_format=torch.contiguous_format)
    if num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    group_pad = max(16, next_power_of_two(group))
    block_n = decode_block_n(head_dim, query.dtype)
    if num_splits is None:
        splits, _ = choose_splits(num_seqs, num_kv_heads, max_seq_len, num_sms(query.device), block_n)
    else:
        splits, _ = splits_for(max_seq_len, min(num_splits, MAX_SPLITS), block_n)
    single = splits == 1
    if single:
        partial_acc = partial_max = partial_sum = out  # unused
    else:
        rows = num_seqs * num_heads * splits
        partial_acc = torch.empty((rows, head_dim), dtype=torch.float32, device=query.device)
        partial_max = torch.empty((rows,), dtype=torch.float32, device=query.device)
        partial_sum = torch.empty((rows,), dtype=torch.float32, device=query.device)
    pdl = use_pdl(query.device)
    _decode_kernel[(num_seqs, num_kv_heads, splits)](
        query,
        kv_cache,
        block_tables,
        seq_lens,
        out,
        partial_acc,
        partial_max,
        partial_sum,
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
        num_heads,
        splits,
        GROUP=group,
        GROUP_PAD=group_pad,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_N=block_n,
        SINGLE_SPLIT=single,
        PRECISION=dot_precision(query.dtype),
        num_warps=4,
        # float32 tiles are twice the bytes: two stages keep a d256 tile inside shared memory.
        num_stages=2 if query.dtype == torch.float32 else 3,
        USE_PDL=pdl,
        launch_pdl=pdl,
    )
    if not single:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            partial_acc,
            partial_max,
            partial_sum,
            seq_lens,
            out,
            out.stride(0),
            out.stride(1),
            num_heads,
            splits,
            HEAD_DIM=head_dim,
            SPLITS_PAD=max(2, next_power_of_two(splits)),
            BLOCK_N=block_n,
            num_warps=4,
            USE_PDL=pdl,
            launch_pdl=pdl,
        )
    return out
