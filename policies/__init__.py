"""Pure decision functions over snapshots: routing, queue ordering, eviction order."""

from policies.eviction import (
    EvictionPolicy,
    LFUEviction,
    LRUEviction,
    NodeStats,
    eviction_policy,
)
from policies.routing import (
    DEFAULT_ROUTING_POLICY,
    ConsistentHashRouting,
    KvAwareRouting,
    LeastLoadRouting,
    NoReplicaAvailable,
    ReplicaSnapshot,
    RoundRobinRouting,
    RoutingDecision,
    RoutingPolicy,
    RoutingRequest,
    SglangCacheAwareRouting,
    routing_policy,
)

__all__ = [
    "DEFAULT_ROUTING_POLICY",
    "ConsistentHashRouting",
    "EvictionPolicy",
    "KvAwareRouting",
    "LFUEviction",
    "LRUEviction",
    "LeastLoadRouting",
    "NoReplicaAvailable",
    "NodeStats",
    "ReplicaSnapshot",
    "RoundRobinRouting",
    "RoutingDecision",
    "RoutingPolicy",
    "RoutingRequest",
    "SglangCacheAwareRouting",
    "eviction_policy",
    "routing_policy",
]
