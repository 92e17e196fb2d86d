"""The gateway's routing path over simulated replicas, and the oracle to compare it with.

`SimGateway.choose` is gateway/pool.py ModelPool.choose line for line: the same prefix index
(cache/prefix_index.py) fed with the replicas' KV events in sequence order, overlaid with the
prefixes of the requests routed and not finished (cache/inflight_index.py), the same
RoutingRequest (prompt hashes from cache/hashing.py, the first four as first_block_hashes,
the session's last replica) and the same ReplicaSnapshot per replica (in-flight and
prefill-queued counted at routing time, running/waiting/kv_usage from the last /load poll).
A test checks that both give the same decisions for the same state.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from bench.simulator.replica import SimReplica, SimRequest
from cache.inflight_index import InflightPrefixes
from cache.prefix_index import PrefixIndex
from cache.radix_tree import RadixCache
from policies.routing import ReplicaSnapshot, RoutingDecision, RoutingPolicy, RoutingRequest

MAX_SESSIONS = 100_000  # gateway/config.py's default


@dataclass(slots=True)
class ReplicaLoad:
    """What the gateway knows of one replica (gateway/pool.py Replica's load fields)."""

    replica_id: str
    in_flight: int = 0
    prefill_queued: int = 0
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0

    def snapshot(self) -> ReplicaSnapshot:
        return ReplicaSnapshot(
            replica_id=self.replica_id,
            healthy=True,
            in_flight=self.in_flight,
            running=self.running,
            waiting=self.waiting,
            kv_usage=min(max(self.kv_usage, 0.0), 1.0),
            prefill_tokens_queued=self.prefill_queued,
        )


def replica_id(index: int) -> str:
    return f"replica-{index:02d}"


class SimGateway:
    def __init__(self, replicas: Sequence[SimReplica], policy: RoutingPolicy, block_size: int) -> None:
        self.replicas = list(replicas)
        self.policy = policy
        self.block_size = block_size
        self.index = PrefixIndex()
        self.loads = [ReplicaLoad(replica_id(r.index)) for r in self.replicas]
        self._by_id = {load.replica_id: i for i, load in enumerate(self.loads)}
        for load in self.loads:
            self.index.add_replica(load.replica_id, exact=True)
        self._sessions: OrderedDict[str, str] = OrderedDict()
        self._uncached: dict[str, int] = {}
        self.inflight = InflightPrefixes()
        self._routed_hashes: dict[str, Sequence[int]] = {}

    def choose(
        self, request: SimRequest, prompt_hashes: list[int], session_id: str | None, now: float
    ) -> tuple[int, RoutingDecision]:
        if isinstance(self.policy, OracleRouting):
            self.policy.request = request
        matched = self.index.match_all(prompt_hashes, now)
        for routed_to in self.inflight.replicas():
            if routed_to in matched:
                pending = self.inflight.matched_blocks(routed_to, prompt_hashes)
                matched[routed_to] = max(matched[routed_to], pending)
        session_replica = self._sessions.get(session_id) if session_id is not None else None
        routing = RoutingRequest(
            num_tokens=request.prompt_len,
            block_size=self.block_size,
            matched_blocks=matched,
            first_block_hashes=tuple(prompt_hashes[:4]),
            session_id=session_id,
            session_replica=session_replica,
        )
        decision = self.policy.choose(routing, [load.snapshot() for load in self.loads])
        self.index.note_routed(decision.replica_id, prompt_hashes, now)
        if session_id is not None:
            self._sessions[session_id] = decision.replica_id
            self._sessions.move_to_end(session_id)
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
        chosen = self._by_id[decision.replica_id]
        load = self.loads[chosen]
        uncached = max(request.prompt_len - decision.predicted_cached_tokens, 0)
        self._uncached[request.request_id] = uncached
        load.in_flight += 1
        load.prefill_queued += uncached
        # As gateway/proxy.py does when it sends the request.
        self.inflight.add(decision.replica_id, prompt_hashes)
        self._routed_hashes[request.request_id] = prompt_hashes
        return chosen, decision

    # -- what the gateway hears back -----------------------------------------------------
    def first_token(self, request: SimRequest) -> None:
        self.loads[request.replica].prefill_queued -= self._uncached[request.request_id]

    def finished(self, request: SimRequest) -> None:
        load = self.loads[request.replica]
        load.in_flight -= 1
        del self._uncached[request.request_id]
        self.inflight.remove(load.replica_id, self._routed_hashes.pop(request.request_id))

    def sync_events(self, replica: SimReplica) -> None:
        """Apply the replica's new KV events to its exact index, as registry._follow does."""
        index = self.index.exact_index(self.loads[replica.index].replica_id)
        for seq, event in replica.events.drain():
            index.apply(seq, event)

    def poll_loads(self) -> None:
        """The periodic GET /load of every replica."""
        for replica, load in zip(self.replicas, self.loads, strict=True):
            load.running = len(replica.running)
            load.waiting = len(replica.waiting)
            load.kv_usage = replica.kv_usage


def peek_cached_blocks(tree: RadixCache, block_hashes: Sequence[int]) -> int:
    """Leading blocks of `block_hashes` the tree holds, without touching its LRU state."""
    node = tree.root
    i = 0
    while i < len(block_hashes):
        child = node.children.get(block_hashes[i])
        if child is None:
            break
        k = 0
        run = child.block_hashes
        while k < len(run) and i + k < len(block_hashes) and run[k] == block_hashes[i + k]:
            k += 1
        i += k
        if k < len(run):
            break
        node = child
    return i


class OracleRouting:
    """Sees every replica's true cache and queue and picks the least predicted TTFT for the
    request itself (greedy: it does not weigh what its choice does to later requests).

    Predicted TTFT on replica r: the prefill work queued there plus this request's uncached
    tokens (true cache, counting blocks another request there is computing now: the engine's
    dedup makes this one wait for them instead of recomputing them), spread over steps that
    each leave the running decodes their tokens, at the latency model's step cost; plus, if r
    has no free sequence slot, the time until its first running request finishes.
    """

    name: ClassVar[str] = "oracle"

    def __init__(self) -> None:
        self.replicas: list[SimReplica] = []
        self.request: SimRequest | None = None

    def bind(self, replicas: Sequence[SimReplica]) -> None:
        self.replicas = list(replicas)

    def predicted_ttft(self, replica: SimReplica, request: SimRequest) -> tuple[float, int]:
        config, latency = replica.config, replica.latency
        bs = config.block_size
        usable = (request.prompt_len - 1) // bs
        hashes = request.block_hashes[:usable]
        cached_blocks = peek_cached_blocks(replica.tree, hashes)
        inflight = replica.kv._inflight
        while cached_blocks < usable and hashes[cached_blocks] in inflight:
            cached_blocks += 1
        cached = cached_blocks * bs
        own = request.prompt_len - cached
        queued = sum(r.num_remaining_tokens for r in replica.running if r.num_remaining_tokens > 1)
        queued += sum(r.num_tokens - max(r.predicted_cached, 0) for r in replica.waiting)
        decodes = [r for r in replica.running if r.num_remaining_tokens == 1]
        room = max(config.max_batched_tokens - len(decodes), 1)
        steps = math.ceil((queued + own) / room)
        decode_context = sum(r.num_computed_tokens for r in decodes)
        per_step = latency.step_ms(len(decodes), len(decodes) + 1, 0.0, 0.0, decode_context)
        ms = steps * per_step + latency.token_ms * (queued + own)
        ms += latency.context_pair_ms * own * cached + latency.self_pair_ms * own * min(own, 8192) / 2
        if len(replica.running) + len(replica.waiting) >= config.max_num_seqs and decodes:
            ms += min(r.output_len - r.generated for r in decodes) * per_step
        return ms, cached

    def choose(self, request: RoutingRequest, replicas: Sequence[ReplicaSnapshot]) -> RoutingDecision:
        assert self.request is not None, "the simulator sets the request before asking"
        by_id = {replica_id(r.index): r for r in self.replicas}
        scored = []
        for snapshot in sorted(replicas, key=lambda s: s.replica_id):
            ms, cached = self.predicted_ttft(by_id[snapshot.replica_id], self.request)
            scored.append((ms, snapshot.in_flight, snapshot.replica_id, cached))
        best = min(scored)
        return RoutingDecision(
            replica_id=best[2],
            reason="oracle",
            predicted_cached_tokens=request.cached_tokens(best[2]),
            scores=tuple((rid, ms) for ms, _, rid, _ in scored),
        )
