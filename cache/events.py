"""KV events: what a replica's cache stored or dropped, keyed by chained block hashes.

The schema follows vLLM's KV events so that the gateway's prefix index (and tools built
for vLLM) can consume them. A subscriber starts from a snapshot of cached hashes and
applies events in sequence order; a gap in sequence numbers (see KVEventQueue.dropped)
means it must resnapshot.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TypeAlias


@dataclass(frozen=True, slots=True)
class BlockStored:
    """A run of consecutive blocks entered the cache.

    `parent_block_hash` is the hash of the block just before the run, or None when the run
    starts at the first block of a sequence. `token_ids` holds every token of the run.
    """

    block_hashes: tuple[int, ...]
    parent_block_hash: int | None
    token_ids: tuple[int, ...]
    block_size: int
    medium: str = "GPU"


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: tuple[int, ...]
    medium: str = "GPU"


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


KVEvent: TypeAlias = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventQueue:
    """A bounded FIFO of events, each stamped with a sequence number when put.

    Sequence numbers start at 1 and increase by one per put, so a subscriber can detect
    loss. When full, the oldest event is dropped: the publisher must never block the
    engine's step loop on a slow subscriber.
    """

    def __init__(self, maxlen: int = 100_000) -> None:
        if maxlen <= 0:
            raise ValueError(f"maxlen must be positive, got {maxlen}")
        self._events: deque[tuple[int, KVEvent]] = deque(maxlen=maxlen)
        self._last_seq = 0
        self._dropped = 0

    def put(self, event: KVEvent) -> int:
        """Append an event; return its sequence number."""
        if len(self._events) == self._events.maxlen:
            self._dropped += 1
        self._last_seq += 1
        self._events.append((self._last_seq, event))
        return self._last_seq

    def drain(self) -> list[tuple[int, KVEvent]]:
        """Remove and return every queued (sequence number, event), oldest first."""
        drained = list(self._events)
        self._events.clear()
        return drained

    @property
    def dropped(self) -> int:
        """Events lost so far because the queue was full."""
        return self._dropped

    @property
    def last_seq(self) -> int:
        """Sequence number of the latest event put; 0 before the first."""
        return self._last_seq

    def __len__(self) -> int:
        return len(self._events)
