"""Eviction policies: pure sort keys over node statistics."""

from __future__ import annotations

import pytest

from policies import EvictionPolicy, LFUEviction, LRUEviction, NodeStats, eviction_policy


def test_lru_orders_by_last_access() -> None:
    policy = LRUEviction()
    old, new = NodeStats(last_access=1, hit_count=9, num_blocks=1), NodeStats(5, 0, 1)
    assert policy.name == "lru"
    assert policy.priority(old) == (1,)
    assert sorted([new, old], key=policy.priority) == [old, new]


def test_lfu_orders_by_hits_then_recency() -> None:
    policy = LFUEviction()
    cold_old, cold_new, hot = NodeStats(1, 0, 2), NodeStats(7, 0, 2), NodeStats(0, 5, 2)
    assert policy.name == "lfu"
    assert sorted([hot, cold_new, cold_old], key=policy.priority) == [cold_old, cold_new, hot]


def test_factory() -> None:
    assert isinstance(eviction_policy("lru"), LRUEviction)
    assert isinstance(eviction_policy("lfu"), LFUEviction)
    assert isinstance(eviction_policy("lru"), EvictionPolicy)
    with pytest.raises(ValueError, match="unknown eviction policy"):
        eviction_policy("random")


def test_policies_are_immutable_values() -> None:
    assert LRUEviction() == LRUEviction()
    assert hash(LFUEviction()) == hash(LFUEviction())
    stats = NodeStats(1, 2, 3)
    with pytest.raises(AttributeError):
        stats.hit_count = 4  # type: ignore[misc]
