"""Launch sizes of the split-KV extend kernel (kernels/triton_extend_split.py), from host
sizes only: its tiles and pipeline, and how many splits a batch's key ranges are cut into.
"""

from __future__ import annotations

import torch
import triton

from kernels.triton_common import next_power_of_two, shared_memory_per_program
from kernels.triton_extend import extend_tiles

# Fewest keys a split takes: below this the partial's store and reduce cost more than the
# keys. A multiple of every BLOCK_N.
MIN_SPLIT_KEYS = 256
MAX_SPLITS = 64
# Waves of programs the split count aims for (see choose_extend_splits): one. Two waves (the
# first rule) ran 128 new tokens on 8K cached 7-14 % slower than one, for both split tiles
# (kernels/NOTES.md, v4 and v13).
SPLIT_WAVES = 1
# Rows of a split program's tile (at most; extend_tiles may choose fewer) where the wide
# launch below does not fit: 64 rows fit two programs per SM and beat 128-row tiles of 64 keys
# and 2 stages by 10-14 % on an H200 (kernels/NOTES.md, v4).
SPLIT_BLOCK_M: int | None = 64
# The wide launch: 128-row tiles (extend_tiles' choice for chunks of 64+ tokens), 128-key tiles,
# 3 stages, 8 warps: 62 us against 70 us for the 64-row tiles on 128 new tokens over 8K cached
# (H200, Llama-3-8B heads; kernels/NOTES.md, v5). 16-bit, head_dim <= 128 only, and only where
# a program may claim the shared memory of 3 stages of K and V plus Q (~224 KiB: Hopper's).
WIDE_BLOCK_N, WIDE_STAGES, WIDE_WARPS = 128, 3, 8
# The split kernel's key-loop copies (see triton_extend.EXTEND_UNROLL); two copies of the wide
# launch's 3-stage pipeline do not fit in shared memory.
SPLIT_UNROLL = 1
WIDE_SPLIT_SHARED_BYTES = (WIDE_STAGES * 2 * WIDE_BLOCK_N + 128) * 128 * 2  # bf16, 128 rows x d128


def split_launch(
    group: int, head_dim: int, dtype: torch.dtype, max_query_len: int, device: torch.device
) -> tuple[tuple[int, int, int, int, int], int]:
    """The split kernel's default (GROUP_PAD, BLOCK_Q, BLOCK_M, BLOCK_N, num_warps) and stages."""
    tiles = extend_tiles(group, head_dim, dtype, max_query_len)
    group_pad, block_q, block_m, _, _ = tiles
    wide = (
        block_m == 128
        and head_dim <= 128
        and dtype != torch.float32
        and shared_memory_per_program(device) >= WIDE_SPLIT_SHARED_BYTES
    )
    if wide:
        return (group_pad, block_q, block_m, WIDE_BLOCK_N, WIDE_WARPS), WIDE_STAGES
    return split_tiles(group, head_dim, dtype, max_query_len, SPLIT_BLOCK_M), 2


def split_tiles(
    group: int, head_dim: int, dtype: torch.dtype, max_query_len: int, block_m: int | None = None
) -> tuple[int, int, int, int, int]:
    """extend_tiles' shape, or a forced narrower block_m (64: two programs fit a multiprocessor,
    where a 128-row program's ~190 registers x 256 threads leave room for one)."""
    tiles = extend_tiles(group, head_dim, dtype, max_query_len)
    if block_m is None or block_m >= tiles[2]:
        return tiles
    group_pad, _, _, block_n, _ = tiles
    block_m = max(block_m, group_pad)
    return group_pad, block_m // group_pad, block_m, block_n, max(4, block_m // 16)


def resident_programs(block_m: int) -> int:
    """Extend programs one multiprocessor holds at once (registers bound it; sm_90 figures)."""
    return 1 if block_m >= 128 else 2


def choose_extend_splits(
    num_tokens: int,
    num_seqs: int,
    num_kv_heads: int,
    max_seq_len: int,
    sms: int,
    unsplit_tiles: tuple[int, int],
    split_tiles: tuple[int, int],
) -> int:
    """Splits per q-tile, from host sizes only; the tiles are (BLOCK_Q, BLOCK_M) pairs.

    1 (the unsplit kernel) when the unsplit q-tiles alone fill a wave of the GPU or no
    sequence is long enough to split. Else about SPLIT_WAVES waves of split programs, rounded
    up to a power of two (q-tile counts x KV heads usually are one, so the waves come out
    whole), each split at least MIN_SPLIT_KEYS. The q-tile count is an upper bound (a slack
    tile per sequence; a CUDA graph's bucket carries a padding sequence, and a chunk may fill
    its bucket to two thirds), so the real programs come to one wave or a little less.
    """

    def programs(tiles: tuple[int, int]) -> tuple[int, int]:
        block_q, block_m = tiles
        return (num_tokens // block_q + num_seqs) * num_kv_heads, resident_programs(block_m) * sms

    unsplit, unsplit_slots = programs(unsplit_tiles)
    most = min(MAX_SPLITS, max_seq_len // MIN_SPLIT_KEYS)
    if unsplit >= unsplit_slots or most < 2:
        return 1
    split, slots = programs(split_tiles)
    return min(most, next_power_of_two(triton.cdiv(SPLIT_WAVES * slots, split)))
