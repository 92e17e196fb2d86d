"""Routing policies, one by one: choices, tie-breaks, health, the factory."""

from __future__ import annotations

import dataclasses

import pytest

from policies import (
    ConsistentHashRouting,
    KvAwareRouting,
    LeastLoadRouting,
    NoReplicaAvailable,
    ReplicaSnapshot,
    RoundRobinRouting,
    RoutingPolicy,
    RoutingRequest,
    SglangCacheAwareRouting,
    routing_policy,
)
from policies.routing import DEFAULT_ROUTING_POLICY, ROUTING_POLICIES

BS = 16


def req(num_tokens: int = 1024, session_replica: str | None = None, **matched: int) -> RoutingRequest:
    return RoutingRequest(
        num_tokens=num_tokens,
        block_size=BS,
        matched_blocks=matched,
        first_block_hashes=(1, 2, 3),
        session_replica=session_replica,
    )


def snap(rid: str, in_flight: int = 0, **kw: object) -> ReplicaSnapshot:
    return ReplicaSnapshot(rid, in_flight=in_flight, **kw)  # type: ignore[arg-type]


ALL_NAMES = sorted(ROUTING_POLICIES)


# ---- snapshots and requests --------------------------------------------------------------


def test_request_is_a_frozen_value_with_a_private_copy_of_matches() -> None:
    matched = {"a": 3}
    request = RoutingRequest(num_tokens=100, block_size=BS, matched_blocks=matched)
    matched["a"] = 5
    assert request.matched_blocks["a"] == 3
    with pytest.raises(TypeError):
        request.matched_blocks["a"] = 1  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.num_tokens = 1  # type: ignore[misc]


def test_cached_tokens_leave_the_last_token_to_compute() -> None:
    assert req(1024, a=64).cached_tokens("a") == 1008  # 63 blocks: the last block is recomputed
    assert req(1025, a=64).cached_tokens("a") == 1024
    assert req(1024, a=10).cached_tokens("a") == 160
    assert req(1024, a=10).cached_tokens("b") == 0
    assert req(0).cached_tokens("a") == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"in_flight": -1},
        {"running": -1},
        {"waiting": -2},
        {"prefill_tokens_queued": -1},
        {"kv_usage": 1.5},
        {"kv_usage": -0.1},
    ],
)
def test_snapshot_rejects_impossible_values(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ReplicaSnapshot("a", **kwargs)  # type: ignore[arg-type]


def test_request_rejects_impossible_values() -> None:
    with pytest.raises(ValueError):
        RoutingRequest(num_tokens=-1, block_size=BS)
    with pytest.raises(ValueError):
        RoutingRequest(num_tokens=1, block_size=0)
    with pytest.raises(ValueError):
        RoutingRequest(num_tokens=1, block_size=BS, matched_blocks={"a": -1})


def test_requests_take_the_larger_of_gateway_and_replica_counts() -> None:
    assert snap("a", in_flight=5, running=2, waiting=1).requests == 5
    assert snap("a", in_flight=1, running=2, waiting=4).requests == 6


# ---- every policy ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_NAMES)
def test_no_healthy_replica_raises(name: str) -> None:
    policy = routing_policy(name)
    with pytest.raises(NoReplicaAvailable):
        policy.choose(req(), [])
    with pytest.raises(NoReplicaAvailable):
        policy.choose(req(), [ReplicaSnapshot("a", healthy=False), ReplicaSnapshot("b", healthy=False)])


@pytest.mark.parametrize("name", ALL_NAMES)
def test_unhealthy_replicas_are_never_chosen(name: str) -> None:
    policy = routing_policy(name)
    # The unhealthy one is the most attractive by every measure: cache, load, id order.
    replicas = [ReplicaSnapshot("a", healthy=False), snap("b", in_flight=9), snap("c", in_flight=9)]
    for i in range(10):
        request = RoutingRequest(1024, BS, {"a": 64}, first_block_hashes=(i,))
        decision = policy.choose(request, replicas)
        assert decision.replica_id in {"b", "c"}
        assert {rid for rid, _ in decision.scores} <= {"b", "c"}


@pytest.mark.parametrize("name", ALL_NAMES)
def test_duplicate_replica_ids_are_an_error(name: str) -> None:
    with pytest.raises(ValueError, match="duplicate"):
        routing_policy(name).choose(req(), [snap("a"), snap("a")])


@pytest.mark.parametrize("name", ALL_NAMES)
def test_decision_reports_the_chosen_replicas_cache(name: str) -> None:
    decision = routing_policy(name).choose(req(1024, a=32, b=32), [snap("a"), snap("b")])
    assert decision.predicted_cached_tokens == 512
    assert [rid for rid, _ in decision.scores] == ["a", "b"]


def test_factory() -> None:
    assert DEFAULT_ROUTING_POLICY == "kv_aware"
    assert isinstance(routing_policy(), KvAwareRouting)
    for name in ALL_NAMES:
        policy = routing_policy(name)
        assert policy.name == name
        assert isinstance(policy, RoutingPolicy)
    assert routing_policy("kv_aware", decode_weight=64.0) == KvAwareRouting(decode_weight=64.0)
    assert routing_policy("consistent_hash", virtual_nodes=8).virtual_nodes == 8  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="unknown routing policy"):
        routing_policy("random")
    with pytest.raises(ValueError, match="bad options"):
        routing_policy("least_load", decode_weight=1.0)


# ---- kv_aware ----------------------------------------------------------------------------


def test_kv_aware_cost_in_token_equivalents() -> None:
    policy = KvAwareRouting()
    request = req(1024, a=32)  # a: 512 cached
    a = snap("a", in_flight=2, prefill_tokens_queued=100)
    b = snap("b", running=1, waiting=2)
    assert policy.cost(request, a) == 512 + 2 * 128 + 0.5 * 100  # queued prefill at half weight
    assert policy.cost(request, b) == 1024 + 3 * 128
    decision = policy.choose(request, [b, a])
    assert decision.replica_id == "a"
    assert decision.reason == "cache_hit"
    assert decision.predicted_cached_tokens == 512
    assert decision.scores == (("a", 818.0), ("b", 1408.0))


def test_kv_aware_long_prefix_beats_an_idle_replica_at_moderate_load() -> None:
    request = req(2304, a=128)  # a 2k-token conversation cached on a
    decision = KvAwareRouting().choose(request, [snap("a", in_flight=12), snap("b")])
    assert (decision.replica_id, decision.reason) == ("a", "cache_hit")


def test_kv_aware_load_wins_once_the_gap_outweighs_the_prefix() -> None:
    request = req(2304, a=128)  # 2048 cached tokens = 16 requests of load
    assert KvAwareRouting().choose(request, [snap("a", in_flight=15), snap("b")]).replica_id == "a"
    decision = KvAwareRouting().choose(request, [snap("a", in_flight=17), snap("b")])
    assert (decision.replica_id, decision.reason) == ("b", "load_balance")


def test_kv_aware_counts_queued_prefill() -> None:
    request = req(1024, a=32, b=32)
    busy = snap("a", prefill_tokens_queued=4000)  # 2,000 token-equivalents: > 3 requests (384)
    assert KvAwareRouting().choose(request, [busy, snap("b", in_flight=3)]).replica_id == "b"
    # A queue worth less than the prefix a holds does not send the request away from it.
    request = req(3072, a=160)
    queued = snap("a", prefill_tokens_queued=4000)
    assert KvAwareRouting().choose(request, [queued, snap("b")]).replica_id == "a"


def test_kv_aware_ties_go_to_fewer_in_flight_then_id() -> None:
    policy = KvAwareRouting()
    # Same cost (both count 3 requests) but the gateway has fewer of its own on b.
    a = snap("a", in_flight=3, running=3)
    b = snap("b", in_flight=1, running=3)
    assert policy.cost(req(), a) == policy.cost(req(), b)
    assert policy.choose(req(), [a, b]).replica_id == "b"
    decision = policy.choose(req(), [snap("b"), snap("a"), snap("c")])
    assert (decision.replica_id, decision.reason) == ("a", "no_cache")


def test_kv_aware_session_bias_wins_small_differences_only() -> None:
    policy = KvAwareRouting()  # session_bias 256 = two requests of load
    replicas = [snap("a"), snap("b", in_flight=1)]
    decision = policy.choose(req(session_replica="b"), replicas)
    assert (decision.replica_id, decision.reason) == ("b", "session")
    replicas = [snap("a"), snap("b", in_flight=3)]
    assert policy.choose(req(session_replica="b"), replicas).replica_id == "a"
    # A session replica that is gone or unhealthy is simply ignored.
    replicas = [snap("a"), ReplicaSnapshot("b", healthy=False)]
    assert policy.choose(req(session_replica="b"), replicas).replica_id == "a"
    assert policy.choose(req(session_replica="zz"), [snap("a")]).reason == "no_cache"
    # Where it agrees with the cache, the reason stays the cache's.
    assert policy.choose(req(session_replica="b", b=8), [snap("a"), snap("b")]).reason == "cache_hit"
    assert (
        KvAwareRouting(session_bias=0).choose(req(session_replica="b"), [snap("a"), snap("b")]).replica_id
        == "a"
    )


def test_kv_aware_rejects_negative_weights() -> None:
    with pytest.raises(ValueError, match="decode_weight"):
        KvAwareRouting(decode_weight=-1)


# ---- round_robin -------------------------------------------------------------------------


def test_round_robin_cycles_in_id_order_whatever_the_input_order() -> None:
    policy = RoundRobinRouting()
    replicas = [snap("c"), snap("a"), snap("b", in_flight=50)]
    chosen = [policy.choose(req(a=64), replicas[:: 1 if i % 2 else -1]).replica_id for i in range(6)]
    assert chosen == ["a", "b", "c", "a", "b", "c"]
    assert policy.choose(req(), replicas).reason == "round_robin"


def test_round_robin_skips_unhealthy_and_keeps_going() -> None:
    policy = RoundRobinRouting(start=1)
    replicas = [snap("a"), ReplicaSnapshot("b", healthy=False), snap("c")]
    assert [policy.choose(req(), replicas).replica_id for _ in range(4)] == ["c", "a", "c", "a"]
    with pytest.raises(ValueError):
        RoundRobinRouting(start=-1)


# ---- least_load --------------------------------------------------------------------------


def test_least_load_order() -> None:
    policy = LeastLoadRouting()
    assert policy.choose(req(a=64), [snap("a", in_flight=2), snap("b", in_flight=1)]).replica_id == "b"
    # Equal in flight: the replica's own report decides.
    replicas = [snap("a", in_flight=1, running=4), snap("b", in_flight=1, running=1, waiting=1)]
    assert policy.choose(req(), replicas).replica_id == "b"
    decision = policy.choose(req(), [snap("b", in_flight=1), snap("a", in_flight=1)])
    assert (decision.replica_id, decision.reason) == ("a", "load_balance")
    assert decision.scores == (("a", 1.0), ("b", 1.0))


# ---- consistent_hash ---------------------------------------------------------------------


def test_consistent_hash_is_sticky_per_key() -> None:
    policy = ConsistentHashRouting()
    replicas = [snap(f"r{i}") for i in range(5)]
    by_prefix = {
        policy.choose(RoutingRequest(100, BS, first_block_hashes=(7, 8, 9, i)), replicas).replica_id
        for i in range(5)
    }
    assert len(by_prefix) > 1  # different prefixes spread
    request = RoutingRequest(100, BS, first_block_hashes=(7, 8, 9))
    first = policy.choose(request, replicas)
    assert first.reason == "hash"
    # Load is ignored: the same key goes to the same replica however busy it is.
    busy = [
        dataclasses.replace(r, in_flight=100) if r.replica_id == first.replica_id else r for r in replicas
    ]
    assert policy.choose(request, busy).replica_id == first.replica_id
    # The winner is the replica nearest clockwise: the smallest score.
    assert min(first.scores, key=lambda s: s[1])[0] == first.replica_id


def test_consistent_hash_keys_on_the_first_k_blocks() -> None:
    policy = ConsistentHashRouting(prefix_blocks=2)
    replicas = [snap(f"r{i}") for i in range(8)]
    base = policy.choose(RoutingRequest(100, BS, first_block_hashes=(1, 2)), replicas).replica_id
    for tail in range(20):
        request = RoutingRequest(100, BS, first_block_hashes=(1, 2, tail))
        assert policy.choose(request, replicas).replica_id == base


def test_consistent_hash_session_overrides_the_prefix() -> None:
    policy = ConsistentHashRouting()
    replicas = [snap(f"r{i}") for i in range(8)]
    chosen = set()
    for i in range(10):
        request = RoutingRequest(100, BS, first_block_hashes=(i,), session_id="s-1")
        decision = policy.choose(request, replicas)
        assert decision.reason == "session"
        chosen.add(decision.replica_id)
    assert len(chosen) == 1


def test_consistent_hash_without_a_key_balances_load() -> None:
    decision = ConsistentHashRouting().choose(
        RoutingRequest(5, BS), [snap("a", in_flight=3), snap("b", in_flight=1)]
    )
    assert (decision.replica_id, decision.reason) == ("b", "load_balance")


def test_consistent_hash_only_the_failed_replicas_keys_move() -> None:
    policy = ConsistentHashRouting()
    replicas = [snap(f"r{i}") for i in range(4)]
    requests = [RoutingRequest(100, BS, first_block_hashes=(i,)) for i in range(400)]
    before = [policy.choose(r, replicas).replica_id for r in requests]
    down = [dataclasses.replace(r, healthy=r.replica_id != "r2") for r in replicas]
    after = [policy.choose(r, down).replica_id for r in requests]
    for was, now in zip(before, after, strict=True):
        assert now == was or was == "r2"
    assert "r2" not in after
    with pytest.raises(ValueError):
        ConsistentHashRouting(virtual_nodes=0)
    with pytest.raises(ValueError):
        ConsistentHashRouting(prefix_blocks=0)


# ---- sglang_cache_aware ------------------------------------------------------------------


def test_sglang_defaults_are_sgl_routers() -> None:
    policy = SglangCacheAwareRouting()
    assert (policy.cache_threshold, policy.balance_abs_threshold, policy.balance_rel_threshold) == (
        0.5,
        32,
        1.0001,
    )


def test_sglang_balanced_and_matching_goes_to_the_best_match() -> None:
    policy = SglangCacheAwareRouting()
    # 33 vs 2: a 31 gap is within the absolute threshold, so the cache decides.
    decision = policy.choose(req(1024, a=40, b=10), [snap("a", in_flight=33), snap("b", in_flight=2)])
    assert (decision.replica_id, decision.reason) == ("a", "cache_hit")
    assert decision.scores == (("a", 0.625), ("b", 0.15625))


def test_sglang_equal_matches_go_to_the_first_in_id_order() -> None:
    policy = SglangCacheAwareRouting()
    replicas = [snap("b"), snap("a", in_flight=20)]
    assert policy.choose(req(1024, a=40, b=40), replicas).replica_id == "a"


def test_sglang_imbalance_needs_both_thresholds() -> None:
    policy = SglangCacheAwareRouting()
    request = req(1024, a=64)
    # Gap exactly 32: not above the absolute threshold, the cache still decides.
    assert policy.choose(request, [snap("a", in_flight=32), snap("b")]).replica_id == "a"
    decision = policy.choose(request, [snap("a", in_flight=33), snap("b")])
    assert (decision.replica_id, decision.reason) == ("b", "load_balance")
    # A large gap that is relatively small does not trip it once rel_threshold is raised.
    relaxed = SglangCacheAwareRouting(balance_rel_threshold=2.0)
    assert relaxed.choose(request, [snap("a", in_flight=100), snap("b", in_flight=60)]).replica_id == "a"
    assert policy.is_imbalanced([100, 60]) and not relaxed.is_imbalanced([100, 60])


def test_sglang_below_the_match_threshold_goes_to_the_least_loaded() -> None:
    policy = SglangCacheAwareRouting()
    request = req(1024, a=32)  # rate exactly 0.5: not above the threshold
    replicas = [
        snap("a", in_flight=1, kv_usage=0.3),
        snap("b", in_flight=1, kv_usage=0.2),
        snap("c", in_flight=1, kv_usage=0.1),
        snap("d", in_flight=2),
    ]
    decision = policy.choose(request, replicas)
    assert (decision.replica_id, decision.reason) == ("c", "cache_miss")
    with pytest.raises(ValueError):
        SglangCacheAwareRouting(cache_threshold=1.5)
    with pytest.raises(ValueError):
        SglangCacheAwareRouting(balance_abs_threshold=-1)
