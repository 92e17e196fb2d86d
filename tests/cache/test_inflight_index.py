from __future__ import annotations

from cache.inflight_index import InflightPrefixes


def test_leading_match_counts_and_release() -> None:
    inflight = InflightPrefixes()
    assert inflight.matched_blocks("a", [1, 2, 3]) == 0
    inflight.add("a", [1, 2, 3])
    inflight.add("a", [1, 2, 9])
    assert inflight.matched_blocks("a", [1, 2, 3, 4]) == 3
    assert inflight.matched_blocks("a", [1, 2, 9]) == 3
    assert inflight.matched_blocks("a", [2, 3]) == 2  # no chaining here: hashes already chain
    assert inflight.matched_blocks("b", [1, 2, 3]) == 0
    inflight.remove("a", [1, 2, 3])
    assert inflight.matched_blocks("a", [1, 2, 3]) == 2  # 1 and 2 still held by the other request
    inflight.remove("a", [1, 2, 9])
    assert len(inflight) == 0 and inflight.replicas() == []
    inflight.remove("a", [1])  # an end after the replica was forgotten is harmless
    inflight.add("b", [5])
    inflight.forget("b")
    assert inflight.matched_blocks("b", [5]) == 0
