"""Prefixes being prefilled right now: what a replica will hold once its queued requests run.

The exact index learns a replica's blocks from its KV events, i.e. after the prefill. Between
routing a request and that moment, a second request with the same prefix sent to the same
replica costs no second prefill (the engine's in-flight dedup makes it wait for the first),
but the exact index still says "not cached". Without this overlay a hot prefix sent to a
new replica looks uncached there for every request until the first one's prefill is done,
so the router keeps piling the burst onto the old holder.

Per replica, a multiset of the block hashes of its routed, unfinished requests (a
request's hashes are added when it is routed and removed when it ends). Bounded by the
requests in flight.
"""

from __future__ import annotations

from collections.abc import Sequence


class InflightPrefixes:
    def __init__(self) -> None:
        self._held: dict[str, dict[int, int]] = {}

    def add(self, replica_id: str, block_hashes: Sequence[int]) -> None:
        held = self._held.setdefault(replica_id, {})
        for h in block_hashes:
            held[h] = held.get(h, 0) + 1

    def remove(self, replica_id: str, block_hashes: Sequence[int]) -> None:
        held = self._held.get(replica_id)
        if held is None:
            return
        for h in block_hashes:
            count = held.get(h, 0) - 1
            if count > 0:
                held[h] = count
            else:
                held.pop(h, None)
        if not held:
            del self._held[replica_id]

    def forget(self, replica_id: str) -> None:
        """The replica left (or restarted cold): its queued prefills are gone with it."""
        self._held.pop(replica_id, None)

    def matched_blocks(self, replica_id: str, block_hashes: Sequence[int]) -> int:
        """Leading blocks of the request that an unfinished request routed to the replica shares."""
        held = self._held.get(replica_id)
        if not held:
            return 0
        count = 0
        for h in block_hashes:
            if h not in held:
                break
            count += 1
        return count

    def replicas(self) -> list[str]:
        return list(self._held)

    def __len__(self) -> int:
        return sum(len(held) for held in self._held.values())
