"""Pure decision functions over snapshots: routing, queue ordering, eviction order."""

from policies.eviction import (
    EvictionPolicy,
    LFUEviction,
    LRUEviction,
    NodeStats,
    eviction_policy,
)

__all__ = [
    "EvictionPolicy",
    "LFUEviction",
    "LRUEviction",
    "NodeStats",
    "eviction_policy",
]
