"""Turn the sequences of one step into the flat tensors the model runs on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kernels.metadata import AttentionMetadata


@dataclass(frozen=True, slots=True)
class SequenceChunk:
    """One sequence's share of a step: new tokens on top of `start_pos` cached ones."""

    token_ids: Sequence[int]
    start_pos: int
    block_ids: Sequence[int]  # must cover start_pos + len(token_ids) tokens
    sample: bool = True  # whether its last token's logits are needed


@dataclass(frozen=True, slots=True)
class ForwardBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    metadata: AttentionMetadata
    logits_indices: torch.Tensor  # rows of the flat batch whose logits are sampled
    sampled_chunks: tuple[int, ...]  # which chunks those rows belong to, in order
    # [3, T]: input_ids, positions and metadata.slot_mapping are its rows (one copy moves all
    # three); its rows may be padded apart (a strided view), each starting 16-byte aligned
    token_rows: torch.Tensor


def build_forward_batch(
    chunks: Sequence[SequenceChunk], block_size: int, device: torch.device
) -> ForwardBatch:
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    query_start = [0]
    seq_lens: list[int] = []
    logits_rows: list[int] = []
    sampled: list[int] = []
    for index, chunk in enumerate(chunks):
        count = len(chunk.token_ids)
        end = chunk.start_pos + count
        if count == 0 or len(chunk.block_ids) * block_size < end:
            raise ValueError(f"chunk {index}: {count} tokens at {chunk.start_pos} need more blocks")
        input_ids.extend(chunk.token_ids)
        span = range(chunk.start_pos, end)
        positions.extend(span)
        # A token's slot is its block's first slot plus its offset in the block.
        slots.extend(chunk.block_ids[pos // block_size] * block_size + pos % block_size for pos in span)
        query_start.append(query_start[-1] + count)
        seq_lens.append(end)
        if chunk.sample:
            logits_rows.append(query_start[-1] - 1)
            sampled.append(index)
    num_tokens, num_seqs = len(input_ids), len(chunks)
    width = max((len(c.block_ids) for c in chunks), default=0)
    # Everything in one buffer and one copy: a step used to queue seven small host-to-device
    # copies (~3 us of GPU time each at batch 1, between one step's sampling and the next
    # step's forward). Every part starts 16-byte aligned: Triton compiles a kernel variant per
    # 16-byte alignment of each pointer it is passed, so parts at offsets that moved with the
    # batch's sizes compiled new variants of the attention kernels in the middle of serving
    # (1-2 s a step; kernels/NOTES.md, v15).
    tokens = _padded(num_tokens, 8)  # each row of token_rows, in int64s
    sampled_rows = _padded(len(logits_rows), 8)
    starts = _padded(num_seqs + 1, 4)  # int32s
    lens = _padded(num_seqs, 4)
    wide = 3 * tokens + sampled_rows
    narrow = starts + lens + num_seqs * width
    host = torch.empty(8 * wide + 4 * narrow, dtype=torch.uint8, pin_memory=device.type == "cuda")
    values = host.numpy()
    longs = values[: 8 * wide].view(np.int64)
    longs[:num_tokens] = input_ids
    longs[tokens : tokens + num_tokens] = positions
    longs[2 * tokens : 2 * tokens + num_tokens] = slots
    longs[3 * tokens : 3 * tokens + len(logits_rows)] = logits_rows
    ints = values[8 * wide :].view(np.int32)
    ints[: num_seqs + 1] = query_start
    ints[starts : starts + num_seqs] = seq_lens
    table = ints[starts + lens :].reshape(num_seqs, width)
    table.fill(0)
    for row, chunk in zip(table, chunks, strict=True):
        row[: len(chunk.block_ids)] = chunk.block_ids
    packed = to_device(host, device)
    device_longs = packed[: 8 * wide].view(torch.int64)
    device_ints = packed[8 * wide :].view(torch.int32)
    token_rows = device_longs[: 3 * tokens].view(3, tokens)[:, :num_tokens]
    metadata = AttentionMetadata(
        query_start_loc=device_ints[: num_seqs + 1],
        seq_lens=device_ints[starts : starts + num_seqs],
        block_tables=device_ints[starts + lens :].view(num_seqs, width),
        slot_mapping=token_rows[2],
        query_lens_host=tuple(len(c.token_ids) for c in chunks),
        seq_lens_host=tuple(seq_lens),
        block_size=block_size,
    )
    return ForwardBatch(
        input_ids=token_rows[0],
        positions=token_rows[1],
        metadata=metadata,
        logits_indices=device_longs[3 * tokens : 3 * tokens + len(logits_rows)],
        sampled_chunks=tuple(sampled),
        token_rows=token_rows,
    )


def _padded(count: int, bytes_each: int) -> int:
    """`count` items rounded up to a whole number of 16 bytes."""
    per_16 = 16 // bytes_each
    return -(-count // per_16) * per_16


def to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor's copy on `device`, queued without waiting for the device to go idle.

    A plain copy from pageable memory synchronizes with the stream, so the host would wait
    for the step in flight before it could build the next one; a pinned buffer lets the copy
    queue behind it (the caching host allocator keeps the buffer until the copy has run).
    """
    if device.type == "cuda":
        pinned = values if values.is_pinned() else values.pin_memory()
        return pinned.to(device, non_blocking=True)
    return values.to(device)
