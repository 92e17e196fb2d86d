"""kv_aware, the default: route to the replica where the request costs least, cache included.

Routing is a cost, not a switch. For each healthy replica r:

    cost(r) = prefill_weight * (num_tokens - cached_tokens(r))     # prefill r would do for us
            + decode_weight  * requests(r)                          # requests r is already serving
            + queue_weight   * prefill_tokens_queued(r)             # prefill queued ahead of us
            - session_bias   * [r served this session last]

and the argmin wins; ties go to fewer in-flight requests, then to replica id order.

Units: token-equivalents of work, where one prompt token to prefill is 1. `requests(r)` is
the larger of the gateway's in-flight count and the replica's running + waiting (see
ReplicaSnapshot.requests): waiting requests count there as future decode load, and their
prompts count again through prefill_tokens_queued, as work that runs before ours.

Why decode_weight = 128: a request in flight occupies a batch slot for the rest of its
answer, typically 100s of decode steps. Decode is bound by memory bandwidth: each step
reads every running request's KV, so one more request with a ~2k-token context costs an
8B model (GQA, 128 KiB of KV per token) ~0.27 GB of reads per step, ~0.09 ms at the 3 TB/s
measured on our H100s, about 3 prefill tokens' worth of compute (16 GFLOP per token, ~27 us
at ~600 TFLOP/s). Over a
remaining answer of ~50-200 steps that is ~150-600 prompt tokens. We take the low end,
128 (a power of two, easy to reason with), because a lower weight favours the cache, and
the cache saving is certain while the remaining answer length is a guess.

What the default buys, in requests of extra load that a cached prefix outweighs
(cached tokens / 128):

    cached prefix   512   1k   2k   4k   8k tokens
    keeps winning   <4   <8   <16  <32  <64 more requests in flight than the idlest replica

(a) An agent's long conversation (2k-8k tokens) stays on the replica that holds it at
    moderate load differences (a handful to a few dozen requests): the prefill it saves
    is worth more than the queueing it adds.
(b) A hot prefix that every request shares does not pile up on its first holder: once
    that replica has P/128 more requests than another (P = prefix tokens), the other's
    miss costs less than the load gap, so it gets a request, prefills the prefix once,
    and caches it. From then on both hold it, the miss cost is equal, and load alone
    decides. The pile-up is bounded by P/128 requests and lasts until the prefix has
    spread; it does not recur, unlike a hard cache/load switch.

queue_weight = 0.5: a prompt token queued ahead of ours delays our first token about as long
as one of our own would, so a TTFT-greedy router weighs it 1. But queued work runs wherever we
route, while a token we fail to reuse is work added to the cluster, and its KV evicts
somebody's prefix. In the simulator (8 replicas, saturated traces, bench/results/
simulate-queue-weight.md) 0.5 against 1 gave document QA with follow-ups a hit rate of 0.856
against 0.758 (the TTFT-greedy oracle: 0.844), RAG with follow-ups TTFT p90 405 ms against
570, single-turn RAG and ReAct agents a little better, a coding-agent trace -1% req/s; 0.25
helped RAG more but cost the coding agents 6% of throughput in preemptions.

session_bias = 256 (two requests' worth of load): the session's previous replica wins ties
and small load differences, never a large one. kv_usage does not enter the cost: a full cache
shows up as waiting requests, which already count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from policies.routing.base import (
    ReplicaSnapshot,
    RoutingDecision,
    RoutingRequest,
    eligible_replicas,
)


@dataclass(frozen=True)
class KvAwareRouting:
    """Argmin of the cost in the module docstring. Scores: each replica's cost (lower wins).

    Reasons: "session" when the session bias changed the winner; otherwise "cache_hit" when
    the winner holds the longest cached prefix any eligible replica holds, "load_balance"
    when a longer one sat on a replica that lost on load, "no_cache" when none holds any.
    """

    name: ClassVar[str] = "kv_aware"

    prefill_weight: float = 1.0
    decode_weight: float = 128.0
    queue_weight: float = 0.5
    session_bias: float = 256.0

    def __post_init__(self) -> None:
        for option in ("prefill_weight", "decode_weight", "queue_weight", "session_bias"):
            if getattr(self, option) < 0:
                raise ValueError(f"{option} must be >= 0, got {getattr(self, option)}")

    def base_cost(self, request: RoutingRequest, replica: ReplicaSnapshot) -> float:
        """The cost without the session bias."""
        missing = request.num_tokens - request.cached_tokens(replica.replica_id)
        return (
            self.prefill_weight * missing
            + self.decode_weight * replica.requests
            + self.queue_weight * replica.prefill_tokens_queued
        )

    def cost(self, request: RoutingRequest, replica: ReplicaSnapshot) -> float:
        cost = self.base_cost(request, replica)
        if request.session_replica is not None and request.session_replica == replica.replica_id:
            cost -= self.session_bias
        return cost

    def choose(self, request: RoutingRequest, replicas: Sequence[ReplicaSnapshot]) -> RoutingDecision:
        eligible = eligible_replicas(replicas)
        costs = {r.replica_id: self.cost(request, r) for r in eligible}
        best = min(eligible, key=lambda r: (costs[r.replica_id], r.in_flight, r.replica_id))
        cached = request.cached_tokens(best.replica_id)
        most_cached = max(request.cached_tokens(r.replica_id) for r in eligible)
        reason = "cache_hit" if cached == most_cached else "load_balance"
        if most_cached == 0:
            reason = "no_cache"
        if request.session_replica in costs and self.session_bias:
            unbiased = min(eligible, key=lambda r: (self.base_cost(request, r), r.in_flight, r.replica_id))
            if unbiased.replica_id != best.replica_id:
                reason = "session"
        return RoutingDecision(
            replica_id=best.replica_id,
            reason=reason,
            predicted_cached_tokens=cached,
            scores=tuple(costs.items()),
        )
