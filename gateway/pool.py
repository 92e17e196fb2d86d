"""One model's pool: its replicas, prefix index, hasher, tokenizer, routing policy and sessions.

Several models may be served: each replica registers the model it holds (its /internal/info),
and the request's `model` field picks the pool. Everything a routing decision reads lives
here; `choose` is the only place that asks the policy.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from cache.hashing import BlockHasher
from cache.inflight_index import InflightPrefixes
from cache.prefix_index import PrefixIndex
from engine.server.protocol import LoadReport, ReplicaInfo
from gateway.text import GatewayTokenizer
from policies.routing import ReplicaSnapshot, RoutingDecision, RoutingPolicy, RoutingRequest

CONNECTING, HEALTHY, UNHEALTHY = "connecting", "healthy", "unhealthy"


@dataclass(eq=False, slots=True)
class Replica:
    url: str
    exact: bool = True  # our engine, with KV events; False: a foreign backend
    status: str = CONNECTING
    info: ReplicaInfo | None = None
    model: str | None = None
    load: LoadReport | None = None
    in_flight: int = 0  # requests sent and not finished, counted here
    prefill_queued: int = 0  # uncached prompt tokens of those not yet at their first token
    failures: int = 0  # consecutive request failures (circuit breaker)
    last_error: str | None = None
    attempted: bool = False  # the first connection attempt is over (synced or failed)
    resyncs: int = 0  # snapshots loaded
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.url

    @property
    def healthy(self) -> bool:
        return self.status == HEALTHY

    def snapshot(self, excluded: bool = False) -> ReplicaSnapshot:
        engine = self.load.engine if self.load is not None else None
        return ReplicaSnapshot(
            replica_id=self.url,
            healthy=self.healthy and not excluded,
            in_flight=self.in_flight,
            running=engine.running if engine else 0,
            waiting=engine.waiting if engine else 0,
            kv_usage=min(max(engine.kv_usage, 0.0), 1.0) if engine else 0.0,
            prefill_tokens_queued=self.prefill_queued,
        )


@dataclass(frozen=True, slots=True)
class Route:
    replica: Replica
    decision: RoutingDecision
    block_hashes: list[int]
    matched_blocks: Mapping[str, int]  # per replica: leading blocks its index holds


class ModelPool:
    def __init__(
        self,
        name: str,
        info: ReplicaInfo,
        tokenizer: GatewayTokenizer,
        policy: RoutingPolicy,
        *,
        ttl_s: float,
        approximate_max_blocks: int,
        max_sessions: int,
    ) -> None:
        self.name = name
        self.info = info
        self.aliases = frozenset(info.aliases)
        self.tokenizer = tokenizer
        self.hasher = BlockHasher(info.model_id, info.block_size)
        self.policy = policy
        self.index = PrefixIndex(ttl_s=ttl_s, max_entries=approximate_max_blocks)
        # Prefixes routed and not yet finished: cached there as soon as their prefill runs.
        self.inflight = InflightPrefixes()
        self.replicas: dict[str, Replica] = {}
        self._sessions: OrderedDict[str, str] = OrderedDict()
        self._max_sessions = max_sessions

    def compatible(self, info: ReplicaInfo) -> str | None:
        """Why a replica cannot join (another hash model id or block size), or None."""
        if (info.model_id, info.block_size) != (self.info.model_id, self.info.block_size):
            return (
                f"model {self.name!r} is served with model id {self.info.model_id!r} and block size "
                f"{self.info.block_size}; this replica has {info.model_id!r} and {info.block_size}"
            )
        return None

    def join(self, replica: Replica) -> None:
        if replica.url not in self.replicas:
            self.replicas[replica.url] = replica
            self.index.add_replica(replica.url, exact=replica.exact)

    def leave(self, replica: Replica) -> None:
        if self.replicas.pop(replica.url, None) is not None:
            self.index.remove_replica(replica.url)
            self.inflight.forget(replica.url)
        for session, url in list(self._sessions.items()):
            if url == replica.url:
                del self._sessions[session]

    def choose(
        self,
        token_ids: Sequence[int],
        cache_salt: str | None,
        session_id: str | None,
        exclude: Collection[str] = (),
        block_hashes: list[int] | None = None,
    ) -> Route:
        """Hash the prompt, match it against every replica's index, ask the policy (raises
        NoReplicaAvailable when no healthy replica is left)."""
        hashes = block_hashes if block_hashes is not None else self.hasher.hashes(token_ids, cache_salt)
        now = time.monotonic()
        matched = self.index.match_all(hashes, now)
        for replica_id in self.inflight.replicas():
            if replica_id in matched:
                pending = self.inflight.matched_blocks(replica_id, hashes)
                matched[replica_id] = max(matched[replica_id], pending)
        session_replica = self._sessions.get(session_id) if session_id is not None else None
        request = RoutingRequest(
            num_tokens=len(token_ids),
            block_size=self.hasher.block_size,
            matched_blocks=matched,
            first_block_hashes=tuple(hashes[:4]),
            session_id=session_id,
            session_replica=session_replica,
        )
        snapshots = [r.snapshot(excluded=r.url in exclude) for r in self.replicas.values()]
        decision = self.policy.choose(request, snapshots)
        replica = self.replicas[decision.replica_id]
        self.index.note_routed(replica.url, hashes, now)
        if session_id is not None:
            self._sessions[session_id] = replica.url
            self._sessions.move_to_end(session_id)
            while len(self._sessions) > self._max_sessions:
                self._sessions.popitem(last=False)
        return Route(replica, decision, hashes, matched)
