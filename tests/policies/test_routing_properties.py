"""Property tests: determinism, kv_aware optimality, consistent hashing stability."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from policies.routing import (
    ROUTING_POLICIES,
    ConsistentHashRouting,
    KvAwareRouting,
    NoReplicaAvailable,
    ReplicaSnapshot,
    RoutingRequest,
    SglangCacheAwareRouting,
    routing_policy,
)

IDS = [f"r{i}" for i in range(8)]


@st.composite
def replica_sets(draw: st.DrawFn, min_size: int = 1) -> list[ReplicaSnapshot]:
    ids = draw(st.lists(st.sampled_from(IDS), min_size=min_size, max_size=6, unique=True))
    return [
        ReplicaSnapshot(
            replica_id=rid,
            healthy=draw(st.booleans()) if draw(st.integers(0, 4)) == 0 else True,
            in_flight=draw(st.integers(0, 64)),
            running=draw(st.integers(0, 64)),
            waiting=draw(st.integers(0, 16)),
            kv_usage=draw(st.floats(0, 1)),
            prefill_tokens_queued=draw(st.integers(0, 20_000)),
        )
        for rid in ids
    ]


@st.composite
def requests(draw: st.DrawFn) -> RoutingRequest:
    block_size = draw(st.sampled_from([1, 16, 32]))
    return RoutingRequest(
        num_tokens=draw(st.integers(0, 8192)),
        block_size=block_size,
        matched_blocks=draw(st.dictionaries(st.sampled_from(IDS), st.integers(0, 600), max_size=8)),
        first_block_hashes=tuple(draw(st.lists(st.integers(0, 2**64 - 1), max_size=20))),
        session_id=draw(st.none() | st.sampled_from(["s1", "s2", "s3"])),
        session_replica=draw(st.none() | st.sampled_from(IDS)),
    )


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(ROUTING_POLICIES)), requests(), replica_sets())
def test_same_input_same_decision_whatever_the_order(
    name: str, request: RoutingRequest, replicas: list[ReplicaSnapshot]
) -> None:
    healthy = {r.replica_id for r in replicas if r.healthy}
    if not healthy:
        with pytest.raises(NoReplicaAvailable):
            routing_policy(name).choose(request, replicas)
        return
    # Fresh objects each time: stateful policies (round_robin) start from the same state.
    first = routing_policy(name).choose(request, replicas)
    again = routing_policy(name).choose(request, replicas)
    shuffled = routing_policy(name).choose(request, list(reversed(replicas)))
    assert first == again == shuffled
    assert first.replica_id in healthy
    assert [rid for rid, _ in first.scores] == sorted(healthy)
    assert first.predicted_cached_tokens == request.cached_tokens(first.replica_id)


weights = st.builds(
    KvAwareRouting,
    prefill_weight=st.floats(0, 4),
    decode_weight=st.floats(0, 512),
    queue_weight=st.floats(0, 4),
    session_bias=st.floats(0, 2048),
)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.just(KvAwareRouting()), weights), requests(), replica_sets())
def test_kv_aware_never_picks_a_costlier_replica(
    policy: KvAwareRouting, request: RoutingRequest, replicas: list[ReplicaSnapshot]
) -> None:
    eligible = [r for r in replicas if r.healthy]
    assume(eligible)
    decision = policy.choose(request, replicas)
    chosen = next(r for r in eligible if r.replica_id == decision.replica_id)
    best = min(policy.cost(request, r) for r in eligible)
    assert policy.cost(request, chosen) == best
    # Among the equally cheap: fewest in flight, then the first id.
    tied = [r for r in eligible if policy.cost(request, r) == best]
    assert (chosen.in_flight, chosen.replica_id) == min((r.in_flight, r.replica_id) for r in tied)
    assert dict(decision.scores)[chosen.replica_id] == best


@settings(max_examples=300, deadline=None)
@given(requests(), replica_sets())
def test_sglang_follows_its_switch(request: RoutingRequest, replicas: list[ReplicaSnapshot]) -> None:
    policy = SglangCacheAwareRouting()
    eligible = [r for r in replicas if r.healthy]
    assume(eligible)
    decision = policy.choose(request, replicas)
    loads = [r.in_flight for r in eligible]
    imbalanced = max(loads) - min(loads) > 32 and max(loads) > min(loads) * 1.0001
    chosen = next(r for r in eligible if r.replica_id == decision.replica_id)
    rates = dict(decision.scores)
    if imbalanced:
        assert decision.reason == "load_balance"
        assert chosen.in_flight == min(loads)
    elif max(rates.values()) > 0.5:
        assert decision.reason == "cache_hit"
        assert rates[chosen.replica_id] == max(rates.values())
    else:
        assert decision.reason == "cache_miss"
        assert chosen.in_flight == min(loads)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=8, unique=True),
    st.text(min_size=1, max_size=6),
    st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=40),
)
def test_consistent_hash_a_new_replica_only_takes_keys(
    existing: list[str], newcomer: str, keys: list[int]
) -> None:
    assume(newcomer not in existing)
    policy = ConsistentHashRouting(virtual_nodes=16)
    before_set = [ReplicaSnapshot(rid) for rid in existing]
    after_set = [*before_set, ReplicaSnapshot(newcomer)]
    for key in keys:
        request = RoutingRequest(100, 16, first_block_hashes=(key,))
        before = policy.choose(request, before_set).replica_id
        after = policy.choose(request, after_set).replica_id
        assert after in (before, newcomer)


@pytest.mark.parametrize("num_replicas", [2, 4, 8, 16])
def test_consistent_hash_moves_about_one_in_n_keys(num_replicas: int) -> None:
    policy = ConsistentHashRouting()
    old = [ReplicaSnapshot(f"replica-{i}") for i in range(num_replicas)]
    new = [*old, ReplicaSnapshot(f"replica-{num_replicas}")]
    keys = [RoutingRequest(100, 16, first_block_hashes=(k * 7919, k)) for k in range(4000)]
    moved = sum(policy.choose(r, old).replica_id != policy.choose(r, new).replica_id for r in keys)
    expected = len(keys) / (num_replicas + 1)
    assert 0.6 * expected < moved < 1.4 * expected
    # And the ring spreads keys evenly enough to begin with.
    counts: dict[str, int] = {}
    for r in keys:
        rid = policy.choose(r, old).replica_id
        counts[rid] = counts.get(rid, 0) + 1
    assert max(counts.values()) < 1.5 * len(keys) / num_replicas
