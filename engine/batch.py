"""Turn the sequences of one step into the flat tensors the model runs on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
    max_blocks = max((len(c.block_ids) for c in chunks), default=0)
    # One tensor from padded Python rows: a per-row tensor copy costs more than the whole list.
    table = torch.tensor(
        [list(c.block_ids) + [0] * (max_blocks - len(c.block_ids)) for c in chunks], dtype=torch.int32
    ).reshape(len(chunks), max_blocks)
    metadata = AttentionMetadata(
        query_start_loc=to_device(torch.tensor(query_start, dtype=torch.int32), device),
        seq_lens=to_device(torch.tensor(seq_lens, dtype=torch.int32), device),
        block_tables=to_device(table, device),
        slot_mapping=to_device(torch.tensor(slots, dtype=torch.int64), device),
        query_lens_host=tuple(len(c.token_ids) for c in chunks),
        seq_lens_host=tuple(seq_lens),
        block_size=block_size,
    )
    return ForwardBatch(
        input_ids=to_device(torch.tensor(input_ids, dtype=torch.int64), device),
        positions=to_device(torch.tensor(positions, dtype=torch.int64), device),
        metadata=metadata,
        logits_indices=to_device(torch.tensor(logits_rows, dtype=torch.int64), device),
        sampled_chunks=tuple(sampled),
    )


def to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor's copy on `device`, queued without waiting for the device to go idle.

    A plain copy from pageable memory synchronizes with the stream, so the host would wait
    for the step in flight before it could build the next one; a pinned buffer lets the copy
    queue behind it (the caching host allocator keeps the buffer until the copy has run).
    """
    if device.type == "cuda":
        return values.pin_memory().to(device, non_blocking=True)
    return values.to(device)
