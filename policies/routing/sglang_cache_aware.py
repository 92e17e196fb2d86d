"""sglang_cache_aware: sgl-router's cache_aware algorithm, reimplemented for comparison.

sgl-router (sgl-project/sglang, sgl-router/src/policies/cache_aware.rs) switches between
two modes on every request:

1. If the load is imbalanced, meaning both
       max_load - min_load > balance_abs_threshold   and
       max_load > min_load * balance_rel_threshold,
   it routes to the least loaded worker (load = requests the router has in flight there).
2. Otherwise it finds the worker with the highest prefix match rate (matched / prompt
   length, from its approximate per-worker radix tree of past requests). If that rate is
   above cache_threshold it routes there; if not, to the worker whose tree is smallest
   (the most free cache).

Defaults are sgl-router's: cache_threshold 0.5, balance_abs_threshold 32,
balance_rel_threshold 1.0001.

The mapping here: the match rate comes from our prefix index (matched blocks x block size /
prompt tokens), exact or approximate; "smallest tree" becomes the least loaded replica, with
lower kv_usage (the closest thing to free cache we see) breaking load ties. sgl-router
measures loads over every worker, healthy or not; we measure over the healthy ones, since a
dead replica's stale count should not switch modes. When several replicas share the best
match, sgl-router's tree returns one tenant of the deepest node in its map's fixed
iteration order; replica id order is our deterministic stand-in. That is the switch
DESIGN.md warns about: while loads stay within the thresholds, every request sharing a hot
prefix goes to the same holder, which runs up to ~balance_abs_threshold requests ahead of
the rest before the load mode takes over, and returns there as soon as the gap closes.

Updating the index after the decision (sgl-router inserts the request into the chosen
worker's tree, in both modes) is the caller's job: PrefixIndex.note_routed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from policies.routing.base import ReplicaSnapshot, RoutingDecision, RoutingRequest, eligible_replicas


@dataclass(frozen=True)
class SglangCacheAwareRouting:
    """Reasons: "load_balance" (imbalanced), "cache_hit" (best match above the threshold),
    "cache_miss" (below it). Scores: each replica's prefix match rate."""

    name: ClassVar[str] = "sglang_cache_aware"

    cache_threshold: float = 0.5
    balance_abs_threshold: int = 32
    balance_rel_threshold: float = 1.0001

    def __post_init__(self) -> None:
        if not 0.0 <= self.cache_threshold <= 1.0:
            raise ValueError(f"cache_threshold must be within 0..1, got {self.cache_threshold}")
        if self.balance_abs_threshold < 0:
            raise ValueError(f"balance_abs_threshold must be >= 0, got {self.balance_abs_threshold}")
        if self.balance_rel_threshold < 0:
            raise ValueError(f"balance_rel_threshold must be >= 0, got {self.balance_rel_threshold}")

    def is_imbalanced(self, loads: Sequence[int]) -> bool:
        max_load, min_load = max(loads), min(loads)
        return (
            max_load - min_load > self.balance_abs_threshold
            and max_load > min_load * self.balance_rel_threshold
        )

    @staticmethod
    def match_rate(request: RoutingRequest, replica_id: str) -> float:
        if request.num_tokens == 0:
            return 0.0
        matched = request.matched_blocks.get(replica_id, 0) * request.block_size
        return min(matched, request.num_tokens) / request.num_tokens

    def choose(self, request: RoutingRequest, replicas: Sequence[ReplicaSnapshot]) -> RoutingDecision:
        eligible = eligible_replicas(replicas)
        rates = {r.replica_id: self.match_rate(request, r.replica_id) for r in eligible}
        if self.is_imbalanced([r.in_flight for r in eligible]):
            # sgl-router's min_by_key: the first of the least loaded, in worker order.
            chosen = min(eligible, key=lambda r: (r.in_flight, r.replica_id))
            reason = "load_balance"
        else:
            best_rate = max(rates.values())
            if best_rate > self.cache_threshold:
                chosen = next(r for r in eligible if rates[r.replica_id] == best_rate)
                reason = "cache_hit"
            else:
                chosen = min(eligible, key=lambda r: (r.in_flight, r.kv_usage, r.replica_id))
                reason = "cache_miss"
        return RoutingDecision(
            replica_id=chosen.replica_id,
            reason=reason,
            predicted_cached_tokens=request.cached_tokens(chosen.replica_id),
            scores=tuple(rates.items()),
        )
