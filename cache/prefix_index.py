"""The gateway's prefix index: for a request, how many leading blocks each replica holds.

One per-replica index each (cache/replica_index.py): exact for our own engines, fed by their
KV events; approximate (what we routed there, with a TTL) for foreign backends. Asking each
replica in turn costs O(replicas x matched blocks): a hot prefix of 2,000 blocks held by 32
replicas is 64,000 set lookups per request. So the index also keeps one shared map,
block hash -> bitmask of the replicas holding it, updated through a listener whenever a
per-replica index gains or loses a hash. `match_all` walks the request's hashes once and
ANDs the masks: a replica drops out at the first block it lacks, which is exactly where its
own leading match stops. One dict lookup and one int AND per block, whatever the number of
replicas (the mask is a single machine word up to ~60 replicas).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import TypeAlias

from cache.replica_index import (
    DEFAULT_MAX_BLOCKS,
    DEFAULT_TTL_S,
    ApplyOutcome,
    ApproximatePrefixIndex,
    HashListener,
    ReplicaPrefixIndex,
)

__all__ = [
    "DEFAULT_MAX_BLOCKS",
    "DEFAULT_TTL_S",
    "ApplyOutcome",
    "ApproximatePrefixIndex",
    "HashListener",
    "PrefixIndex",
    "ReplicaIndex",
    "ReplicaPrefixIndex",
]

ReplicaIndex: TypeAlias = ReplicaPrefixIndex | ApproximatePrefixIndex


class _MaskListener:
    """Keeps one replica's bit in the shared hash -> replica bitmask map."""

    __slots__ = ("_bit", "_masks", "active")

    def __init__(self, masks: dict[int, int], bit: int) -> None:
        self._masks = masks
        self._bit = bit
        # Cleared when the replica is removed: its bit may be reused by a new replica, so a
        # caller still holding the old index must no longer reach the shared map.
        self.active = True

    def added(self, hashes: Sequence[int]) -> None:
        if not self.active:
            return
        masks, bit = self._masks, self._bit
        for h in hashes:
            masks[h] = masks.get(h, 0) | bit

    def removed(self, hashes: Sequence[int]) -> None:
        if not self.active:
            return
        masks, keep = self._masks, ~self._bit
        for h in hashes:
            left = masks.get(h, 0) & keep
            if left:
                masks[h] = left
            else:
                masks.pop(h, None)


class PrefixIndex:
    """Per-replica prefix indexes plus the shared map that matches all replicas at once.

    The options are the defaults for the per-replica indexes it creates: `max_blocks` and
    `medium` for exact ones, `ttl_s` and `max_entries` for approximate ones.
    """

    def __init__(
        self,
        *,
        max_blocks: int = DEFAULT_MAX_BLOCKS,
        medium: str = "GPU",
        ttl_s: float = DEFAULT_TTL_S,
        max_entries: int = DEFAULT_MAX_BLOCKS,
    ) -> None:
        self._max_blocks = max_blocks
        self._medium = medium
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._masks: dict[int, int] = {}
        self._indexes: dict[str, ReplicaIndex] = {}
        self._listeners: dict[str, _MaskListener] = {}
        self._slot_of: dict[str, int] = {}
        self._id_of_slot: dict[int, str] = {}
        # Lowest free slot first, so masks stay as narrow as the number of live replicas.
        self._free_slots: list[int] = []
        self._next_slot = 0
        self._all_bits = 0  # one bit per live replica

    # ---- replicas --------------------------------------------------------------------

    @property
    def replica_ids(self) -> tuple[str, ...]:
        return tuple(sorted(self._indexes))

    def __len__(self) -> int:
        return len(self._indexes)

    def __contains__(self, replica_id: object) -> bool:
        return replica_id in self._indexes

    def add_replica(self, replica_id: str, exact: bool = True) -> ReplicaIndex:
        """Start tracking a replica (empty); return its index, to feed events or records to."""
        if replica_id in self._indexes:
            raise ValueError(f"replica {replica_id!r} is already in the index")
        if self._free_slots:
            slot = heapq.heappop(self._free_slots)
        else:
            slot, self._next_slot = self._next_slot, self._next_slot + 1
        listener = _MaskListener(self._masks, 1 << slot)
        index: ReplicaIndex
        if exact:
            index = ReplicaPrefixIndex(self._max_blocks, self._medium, listener)
        else:
            index = ApproximatePrefixIndex(self._ttl_s, self._max_entries, listener)
        self._indexes[replica_id] = index
        self._listeners[replica_id] = listener
        self._slot_of[replica_id] = slot
        self._id_of_slot[slot] = replica_id
        self._all_bits |= 1 << slot
        return index

    def remove_replica(self, replica_id: str) -> None:
        """Stop tracking a replica and forget everything it held."""
        index = self._get(replica_id)
        listener = self._listeners.pop(replica_id)
        listener.removed(list(index))
        listener.active = False
        del self._indexes[replica_id]
        slot = self._slot_of.pop(replica_id)
        del self._id_of_slot[slot]
        self._all_bits &= ~(1 << slot)
        heapq.heappush(self._free_slots, slot)

    def index(self, replica_id: str) -> ReplicaIndex:
        return self._get(replica_id)

    def exact_index(self, replica_id: str) -> ReplicaPrefixIndex:
        index = self._get(replica_id)
        if not isinstance(index, ReplicaPrefixIndex):
            raise TypeError(f"replica {replica_id!r} has an approximate index")
        return index

    def approximate_index(self, replica_id: str) -> ApproximatePrefixIndex:
        index = self._get(replica_id)
        if not isinstance(index, ApproximatePrefixIndex):
            raise TypeError(f"replica {replica_id!r} has an exact index")
        return index

    def _get(self, replica_id: str) -> ReplicaIndex:
        try:
            return self._indexes[replica_id]
        except KeyError:
            raise KeyError(f"unknown replica {replica_id!r}") from None

    # ---- updates and queries ---------------------------------------------------------

    def note_routed(self, replica_id: str, request_hashes: Sequence[int], now: float) -> None:
        """Tell the index a request went to `replica_id`.

        Approximate replicas record it; exact ones ignore it, because their KV events will
        say what they really cached (and guessing would make the exact index inexact).
        """
        index = self._get(replica_id)
        if isinstance(index, ApproximatePrefixIndex):
            index.record(request_hashes, now)

    def expire(self, now: float) -> int:
        """Expire every approximate index; return how many entries went."""
        return sum(
            index.expire(now) for index in self._indexes.values() if isinstance(index, ApproximatePrefixIndex)
        )

    def match_all(self, request_hashes: Sequence[int], now: float) -> dict[str, int]:
        """Leading blocks of the request held by each replica (0 where none), in id order.

        Equal to asking each replica's `matched_blocks`; `now` expires approximate entries
        first, exactly as their own `matched_blocks(hashes, now)` would.
        """
        self.expire(now)
        result = dict.fromkeys(self.replica_ids, 0)
        masks, id_of_slot = self._masks, self._id_of_slot
        candidates = self._all_bits
        depth = 0
        for h in request_hashes:
            if not candidates:
                break
            still = candidates & masks.get(h, 0)
            if still != candidates:
                # Replicas that lack block `depth` hold exactly `depth` leading blocks.
                dropped = candidates & ~still
                if depth:
                    while dropped:
                        low = dropped & -dropped
                        result[id_of_slot[low.bit_length() - 1]] = depth
                        dropped ^= low
                candidates = still
            depth += 1
        while candidates:
            low = candidates & -candidates
            result[id_of_slot[low.bit_length() - 1]] = depth
            candidates ^= low
        return result
