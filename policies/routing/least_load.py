"""least_load: the replica with the fewest requests, blind to the cache. A baseline."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from policies.routing.base import (
    ReplicaSnapshot,
    RoutingDecision,
    RoutingRequest,
    eligible_replicas,
    least_loaded,
)


@dataclass(frozen=True)
class LeastLoadRouting:
    """Fewest in-flight requests, then fewest running + waiting, then replica id.

    In-flight comes first because it is the gateway's own, always-fresh count; the
    replica's report lags by a poll interval. Scores: each replica's in-flight count.
    """

    name: ClassVar[str] = "least_load"

    def choose(self, request: RoutingRequest, replicas: Sequence[ReplicaSnapshot]) -> RoutingDecision:
        eligible = eligible_replicas(replicas)
        chosen = least_loaded(eligible)
        return RoutingDecision(
            replica_id=chosen.replica_id,
            reason="load_balance",
            predicted_cached_tokens=request.cached_tokens(chosen.replica_id),
            scores=tuple((r.replica_id, float(r.in_flight)) for r in eligible),
        )
