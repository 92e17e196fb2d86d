"""A step's inputs: built from its chunks in one buffer (one host-to-device copy on a GPU), and
placeholder ids swapped for the tokens the step before sampled (kernels/future_tokens.py)."""

from __future__ import annotations

import pytest
import torch

from engine.batch import SequenceChunk, build_forward_batch
from kernels.future_tokens import resolve_torch


def test_batch_tensors_are_views_of_one_buffer_with_the_right_values() -> None:
    chunks = [
        SequenceChunk([5, 6, 7], start_pos=0, block_ids=[9]),
        SequenceChunk([8], start_pos=6, block_ids=[2, 4], sample=False),
        SequenceChunk([11, 12], start_pos=3, block_ids=[7, 3]),
    ]
    batch = build_forward_batch(chunks, block_size=4, device=torch.device("cpu"))
    meta = batch.metadata
    assert batch.input_ids.tolist() == [5, 6, 7, 8, 11, 12]
    assert batch.positions.tolist() == [0, 1, 2, 6, 3, 4]
    assert meta.slot_mapping.tolist() == [36, 37, 38, 18, 31, 12]
    assert batch.logits_indices.tolist() == [2, 5] and batch.sampled_chunks == (0, 2)
    assert meta.query_start_loc.tolist() == [0, 3, 4, 6] and meta.seq_lens.tolist() == [3, 7, 5]
    assert meta.block_tables.tolist() == [[9, 0], [2, 4], [7, 3]]
    assert meta.block_tables.dtype == meta.seq_lens.dtype == torch.int32
    assert batch.input_ids.dtype == meta.slot_mapping.dtype == torch.int64
    assert torch.equal(batch.token_rows, torch.stack([batch.input_ids, batch.positions, meta.slot_mapping]))
    storage = batch.input_ids.untyped_storage().data_ptr()
    for tensor in (batch.positions, batch.logits_indices, meta.seq_lens, meta.block_tables, batch.token_rows):
        assert tensor.untyped_storage().data_ptr() == storage


@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (2, 1), (3, 5), (7, 2), (5, 16)], ids=str)
def test_every_part_starts_16_byte_aligned_whatever_the_sizes(shape: tuple[int, int]) -> None:
    """Triton compiles a variant of a kernel per 16-byte alignment of each pointer argument:
    parts whose offsets moved with the batch's token and sequence counts compiled new
    attention kernels in the middle of serving (kernels/NOTES.md, v15)."""
    num_seqs, tokens_each = shape
    chunks = [
        SequenceChunk(list(range(tokens_each)), start_pos=i, block_ids=list(range(i + 6)), sample=i % 2 == 0)
        for i in range(num_seqs)
    ]
    batch = build_forward_batch(chunks, block_size=4, device=torch.device("cpu"))
    meta = batch.metadata
    base = batch.input_ids.untyped_storage().data_ptr()
    parts = {
        "input_ids": batch.input_ids, "positions": batch.positions, "slot_mapping": meta.slot_mapping,
        "logits_indices": batch.logits_indices, "query_start_loc": meta.query_start_loc,
        "seq_lens": meta.seq_lens, "block_tables": meta.block_tables,
    }  # fmt: skip
    for name, tensor in parts.items():
        assert (tensor.data_ptr() - base) % 16 == 0, name
    assert batch.input_ids.tolist() == list(range(tokens_each)) * num_seqs
    assert meta.seq_lens.tolist() == [i + tokens_each for i in range(num_seqs)]
    assert meta.block_tables[-1].tolist() == list(range(num_seqs + 5))
    assert batch.logits_indices.tolist() == [(i + 1) * tokens_each - 1 for i in range(0, num_seqs, 2)]


def test_a_chunk_without_enough_blocks_is_refused() -> None:
    with pytest.raises(ValueError, match="need more blocks"):
        build_forward_batch([SequenceChunk([1, 2], start_pos=3, block_ids=[0])], 4, torch.device("cpu"))


def test_placeholders_take_the_sampled_tokens_in_place() -> None:
    future = torch.tensor([40, 41, 42, 43])
    ids = torch.tensor([7, -1, 0, -4, -3, 9])
    resolve_torch(ids, future)
    assert ids.tolist() == [7, 40, 0, 43, 42, 9]
