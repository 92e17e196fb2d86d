"""Routing policies: pure functions of a request and replica snapshots to a replica choice.

`kv_aware` is the default (see its module for the cost model and why its weights); the
others are baselines to compare it with, in the gateway and in the routing simulator.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from policies.routing.base import (
    NoReplicaAvailable,
    ReplicaSnapshot,
    RoutingDecision,
    RoutingPolicy,
    RoutingRequest,
    eligible_replicas,
    least_loaded,
)
from policies.routing.consistent_hash import ConsistentHashRouting
from policies.routing.kv_aware import KvAwareRouting
from policies.routing.least_load import LeastLoadRouting
from policies.routing.round_robin import RoundRobinRouting
from policies.routing.sglang_cache_aware import SglangCacheAwareRouting

DEFAULT_ROUTING_POLICY: Final[str] = KvAwareRouting.name

ROUTING_POLICIES: Final[dict[str, Callable[..., RoutingPolicy]]] = {
    KvAwareRouting.name: KvAwareRouting,
    RoundRobinRouting.name: RoundRobinRouting,
    LeastLoadRouting.name: LeastLoadRouting,
    ConsistentHashRouting.name: ConsistentHashRouting,
    SglangCacheAwareRouting.name: SglangCacheAwareRouting,
}


def routing_policy(name: str = DEFAULT_ROUTING_POLICY, **options: Any) -> RoutingPolicy:
    """A new policy object registered under `name`, built with `options` (its constructor's
    keyword arguments, e.g. `routing_policy("kv_aware", decode_weight=64.0)`)."""
    try:
        factory = ROUTING_POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r} (known: {sorted(ROUTING_POLICIES)})") from None
    try:
        return factory(**options)
    except TypeError as exc:
        raise ValueError(f"bad options for routing policy {name!r}: {exc}") from None


__all__ = [
    "DEFAULT_ROUTING_POLICY",
    "ROUTING_POLICIES",
    "ConsistentHashRouting",
    "KvAwareRouting",
    "LeastLoadRouting",
    "NoReplicaAvailable",
    "ReplicaSnapshot",
    "RoundRobinRouting",
    "RoutingDecision",
    "RoutingPolicy",
    "RoutingRequest",
    "SglangCacheAwareRouting",
    "eligible_replicas",
    "least_loaded",
    "routing_policy",
]
