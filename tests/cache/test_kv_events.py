"""KV event types and the bounded, sequence-numbered event queue."""

from __future__ import annotations

import dataclasses

import pytest

from cache.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventQueue


def test_events_are_frozen_values() -> None:
    stored = BlockStored(block_hashes=(1, 2), parent_block_hash=None, token_ids=(5, 6, 7, 8), block_size=2)
    assert stored.medium == "GPU"
    assert stored == BlockStored((1, 2), None, (5, 6, 7, 8), 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        stored.block_size = 4  # type: ignore[misc]
    assert BlockRemoved((1,)).medium == "GPU"
    assert AllBlocksCleared() == AllBlocksCleared()


def test_sequence_numbers_increase_across_drains() -> None:
    queue = KVEventQueue()
    assert queue.last_seq == 0
    assert queue.put(BlockRemoved((1,))) == 1
    queue.put(AllBlocksCleared())
    assert queue.drain() == [(1, BlockRemoved((1,))), (2, AllBlocksCleared())]
    assert queue.drain() == []
    queue.put(BlockRemoved((2,)))
    assert queue.drain() == [(3, BlockRemoved((2,)))]
    assert queue.last_seq == 3
    assert queue.dropped == 0


def test_full_queue_drops_oldest_and_counts() -> None:
    queue = KVEventQueue(maxlen=3)
    for h in range(5):
        queue.put(BlockRemoved((h,)))
    assert len(queue) == 3
    assert queue.dropped == 2
    drained = queue.drain()
    assert [seq for seq, _ in drained] == [3, 4, 5]
    assert [event for _, event in drained] == [BlockRemoved((2,)), BlockRemoved((3,)), BlockRemoved((4,))]


def test_maxlen_must_be_positive() -> None:
    with pytest.raises(ValueError):
        KVEventQueue(maxlen=0)
