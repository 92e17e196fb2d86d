"""Eviction order for the radix cache, as pure functions over a node's statistics.

The cache keeps its evictable leaves sorted by `priority(stats)` and evicts the smallest
first. A policy must be a pure function of the stats it is given, because the cache
recomputes a node's key only when those stats change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class NodeStats:
    """What a policy may look at: `last_access` is the cache's logical clock, not wall time."""

    last_access: int
    hit_count: int
    num_blocks: int


@runtime_checkable
class EvictionPolicy(Protocol):
    @property
    def name(self) -> str: ...

    def priority(self, stats: NodeStats) -> tuple[int, ...]:
        """Sort key: lower is evicted first."""
        ...


@dataclass(frozen=True)
class LRUEviction:
    """Least recently used first: the default, and what a prefix cache usually wants."""

    name: ClassVar[str] = "lru"

    def priority(self, stats: NodeStats) -> tuple[int, ...]:
        return (stats.last_access,)


@dataclass(frozen=True)
class LFUEviction:
    """Least frequently matched first; recency breaks ties, so a new entry is not kept forever
    merely because an older, equally cold one exists."""

    name: ClassVar[str] = "lfu"

    def priority(self, stats: NodeStats) -> tuple[int, ...]:
        return (stats.hit_count, stats.last_access)


_POLICIES: dict[str, type[LRUEviction] | type[LFUEviction]] = {
    LRUEviction.name: LRUEviction,
    LFUEviction.name: LFUEviction,
}


def eviction_policy(name: str) -> EvictionPolicy:
    """The policy registered under `name` ("lru" or "lfu")."""
    try:
        return _POLICIES[name]()
    except KeyError:
        known = ", ".join(sorted(_POLICIES))
        raise ValueError(f"unknown eviction policy {name!r}; known: {known}") from None
