"""round_robin: the healthy replicas in turn, blind to cache and load. A baseline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from policies.routing.base import ReplicaSnapshot, RoutingDecision, RoutingRequest, eligible_replicas


class RoundRobinRouting:
    """Each call takes the next healthy replica in replica id order. Scores: all 0.

    The counter is the policy's own state (two gateways each keep their own rotation). It
    indexes the current healthy list, so when replicas come or go the rotation carries on
    from the same position rather than restarting.
    """

    name: ClassVar[str] = "round_robin"

    def __init__(self, start: int = 0) -> None:
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self._counter = start

    def choose(self, request: RoutingRequest, replicas: Sequence[ReplicaSnapshot]) -> RoutingDecision:
        eligible = eligible_replicas(replicas)
        chosen = eligible[self._counter % len(eligible)]
        self._counter += 1
        return RoutingDecision(
            replica_id=chosen.replica_id,
            reason="round_robin",
            predicted_cached_tokens=request.cached_tokens(chosen.replica_id),
            scores=tuple((r.replica_id, 0.0) for r in eligible),
        )
