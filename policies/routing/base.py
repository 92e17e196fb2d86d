"""What a routing policy sees and what it answers: frozen snapshots in, a frozen decision out.

The gateway builds a `RoutingRequest` (the request's size and, per replica, how many of its
leading blocks the prefix index says are cached) and one `ReplicaSnapshot` per replica; the
policy returns a `RoutingDecision`. Policies do no I/O and read no clock, so the routing
simulator runs the very same objects.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol, runtime_checkable


class NoReplicaAvailable(RuntimeError):
    """No healthy replica to route to: the gateway answers 503."""


@dataclass(frozen=True, slots=True)
class RoutingRequest:
    num_tokens: int  # prompt length in tokens
    block_size: int
    # Leading blocks of the prompt cached per replica id (from the prefix index); a replica
    # missing here holds none.
    matched_blocks: Mapping[str, int] = field(default_factory=dict)
    # The request's first block hashes, for policies that hash the prefix (consistent_hash).
    first_block_hashes: tuple[int, ...] = ()
    session_id: str | None = None
    # The replica that served this session's previous turn, if the caller remembers it.
    session_replica: str | None = None

    def __post_init__(self) -> None:
        if self.num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {self.num_tokens}")
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if any(m < 0 for m in self.matched_blocks.values()):
            raise ValueError("matched_blocks must be >= 0")
        # A read-only copy: the request is a value, and the caller's dict may keep changing.
        object.__setattr__(self, "matched_blocks", MappingProxyType(dict(self.matched_blocks)))
        object.__setattr__(self, "first_block_hashes", tuple(self.first_block_hashes))

    def cached_tokens(self, replica_id: str) -> int:
        """Prompt tokens `replica_id` can reuse from its cache.

        At most (num_tokens - 1) // block_size blocks: the engine always computes the last
        prompt token, whose logits give the first output token, so a fully cached prompt
        still prefills its last block (engine/kv_manager.py does the same).
        """
        usable = max(self.num_tokens - 1, 0) // self.block_size
        return min(self.matched_blocks.get(replica_id, 0), usable) * self.block_size


@dataclass(frozen=True, slots=True)
class ReplicaSnapshot:
    replica_id: str
    healthy: bool = True
    in_flight: int = 0  # requests the gateway has sent there and not seen finish
    running: int = 0  # as last reported by the replica
    waiting: int = 0  # as last reported by the replica
    kv_usage: float = 0.0  # fraction of its KV cache in use, 0..1
    prefill_tokens_queued: int = 0  # prompt tokens in flight there not yet prefilled, if known

    def __post_init__(self) -> None:
        for name in ("in_flight", "running", "waiting", "prefill_tokens_queued"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.kv_usage <= 1.0:
            raise ValueError(f"kv_usage must be within 0..1, got {self.kv_usage}")

    @property
    def requests(self) -> int:
        """Requests at the replica, best estimate.

        The gateway's own count is fresh but misses traffic from other clients; the
        replica's report sees everything but lags. The larger of the two is the safer bet.
        """
        return max(self.in_flight, self.running + self.waiting)


@dataclass(frozen=True, slots=True)
class RoutingDecision:
    replica_id: str
    reason: str  # short and low-cardinality, for a metrics label: "cache_hit", "load_balance", ...
    predicted_cached_tokens: int
    # What the policy ranked each eligible replica by (its docstring says what), in replica
    # id order, for traces.
    scores: tuple[tuple[str, float], ...] = ()


@runtime_checkable
class RoutingPolicy(Protocol):
    @property
    def name(self) -> str: ...

    def choose(self, request: RoutingRequest, replicas: Sequence[ReplicaSnapshot]) -> RoutingDecision:
        """Pick one healthy replica; raise NoReplicaAvailable when there is none."""
        ...


def eligible_replicas(replicas: Sequence[ReplicaSnapshot]) -> list[ReplicaSnapshot]:
    """The healthy replicas in replica id order, so no decision depends on the input order."""
    ids = [r.replica_id for r in replicas]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate replica ids in {sorted(ids)}")
    healthy = sorted((r for r in replicas if r.healthy), key=lambda r: r.replica_id)
    if not healthy:
        raise NoReplicaAvailable(f"no healthy replica among {len(replicas)}")
    return healthy


def least_loaded(replicas: Sequence[ReplicaSnapshot]) -> ReplicaSnapshot:
    """Fewest requests in flight from the gateway, then fewest reported, then replica id."""
    return min(replicas, key=lambda r: (r.in_flight, r.running + r.waiting, r.replica_id))
