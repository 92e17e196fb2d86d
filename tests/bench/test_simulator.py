"""Routing simulator: exact cache accounting, the engine's rules, the gateway's decisions."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import msgspec
import numpy as np
import pytest

from bench.simulator.calibration import derive, served_kv_ms
from bench.simulator.config import EAGER_ENGINE, PIECEWISE_ENGINE, POLICIES, SPLIT_ENGINE, ReplicaConfig
from bench.simulator.latency import H100_80GB, H200
from bench.simulator.replica import SimReplica, SimRequest
from bench.simulator.router import SimGateway, peek_cached_blocks
from bench.simulator.sim import PreparedTrace, Simulation, SimulationConfig, simulate
from bench.workloads import generate
from bench.workloads.trace import LLAMA3_VOCAB, Segment, Trace, TraceHeader, TraceRequest
from prefixgate.cli import main

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
SMALL_REPLICA = ReplicaConfig(num_blocks=4000, max_num_seqs=32, max_batched_tokens=2048)


def _trace(requests: list[TraceRequest]) -> PreparedTrace:
    header = TraceHeader(workload="test", seed=0, vocab_size=LLAMA3_VOCAB, num_requests=len(requests))
    return PreparedTrace(Trace(header, tuple(requests)))


def _run(
    prepared: PreparedTrace, policy: str = "round_robin", replicas: int = 1, **replica: int
) -> Simulation:
    config = SimulationConfig(num_replicas=replicas, policy=policy, replica=replace(SMALL_REPLICA, **replica))
    sim = Simulation(prepared, config)
    sim.run()
    return sim


def _repeats(count: int, prefix_len: int, suffix_len: int, sequential: bool) -> PreparedTrace:
    prefix = Segment(1, prefix_len)
    return _trace(
        [
            TraceRequest(
                request_id=f"r{i}",
                prompt=[prefix, Segment(100 + i, suffix_len)] if suffix_len else [prefix],
                output_len=8,
                output_key=1000 + i,
                arrival_s=0.0 if not sequential or i == 0 else None,
                after=[f"r{i - 1}"] if sequential and i else [],
            )
            for i in range(count)
        ]
    )


def _check_no_leak(sim: Simulation) -> None:
    for replica in sim.replicas:
        assert not replica.running and not replica.waiting
        replica.kv.check_integrity([])
        assert replica.pool.num_free + replica.tree.num_cached_blocks == replica.pool.num_blocks


def test_one_prefix_repeated_on_one_replica_hits_fully_after_the_first() -> None:
    sim = _run(_repeats(10, 1000, 0, sequential=True))
    cached = {r.request_id: r.cached_tokens for r in sim.records}
    assert cached["r0"] == 0
    # (1000 - 1) // 16 full blocks are reusable: the last prompt token is always computed.
    assert all(cached[f"r{i}"] == 62 * 16 for i in range(1, 10))
    _check_no_leak(sim)


def test_shared_prefix_then_unique_suffix_hits_exactly_the_prefix() -> None:
    sim = _run(_repeats(6, 512, 100, sequential=True))
    assert sorted(r.cached_tokens for r in sim.records) == [0] + [512] * 5
    _check_no_leak(sim)


def test_concurrent_requests_wait_for_the_prefix_another_is_computing() -> None:
    """The engine's in-flight dedup: arriving together, only the first computes the prefix."""
    sim = _run(_repeats(8, 4096, 64, sequential=False))
    cached = sorted(r.cached_tokens for r in sim.records)
    assert cached[0] == 0 and all(c == 4096 for c in cached[1:])
    _check_no_leak(sim)


def test_a_tight_pool_preempts_and_still_finishes_everything_without_leaks() -> None:
    trace = _trace(
        [
            TraceRequest(
                request_id=f"r{i}",
                prompt=[Segment(10 + i, 300)],
                output_len=200,
                output_key=500 + i,
                arrival_s=0.0,
            )
            for i in range(12)
        ]
    )
    sim = _run(trace, num_blocks=120)
    assert len(sim.records) == 12
    assert sum(r.num_preemptions for r in sim.replicas) > 0
    _check_no_leak(sim)


def test_decode_segments_match_stepping_one_step_at_a_time() -> None:
    prepared = PreparedTrace(generate("multi-turn", seed=3, num_conversations=12, conversation_rate=4.0))
    fast = _run(prepared, "kv_aware", replicas=2)
    slow = _run(prepared, "kv_aware", replicas=2, max_segment_steps=1)
    a = {r.request_id: r for r in fast.records}
    b = {r.request_id: r for r in slow.records}
    assert a.keys() == b.keys()
    for rid, record in a.items():
        other = b[rid]
        assert (record.replica, record.cached_tokens) == (other.replica, other.cached_tokens)
        # One step time per segment (KV read at its middle) versus one per step: close, not equal.
        assert record.finish_s == pytest.approx(other.finish_s, rel=0.02)
    steps = sum(r.num_steps for r in fast.replicas)
    assert sum(r.num_steps for r in slow.replicas) == pytest.approx(steps, rel=0.02)


def test_a_run_is_deterministic() -> None:
    prepared = PreparedTrace(generate("agent", seed=1, num_tasks=8))
    first = simulate(prepared, SimulationConfig(num_replicas=3, policy="kv_aware", replica=SMALL_REPLICA))
    second = simulate(prepared, SimulationConfig(num_replicas=3, policy="kv_aware", replica=SMALL_REPLICA))
    assert replace_wall(first) == replace_wall(second)


def replace_wall(summary: object) -> dict:
    data = msgspec.to_builtins(summary)
    data.pop("wall_s")
    return data


def test_peek_matches_the_tree_without_touching_it() -> None:
    sim = _run(_repeats(3, 640, 32, sequential=True))
    tree = sim.replicas[0].tree
    hashes = sim.prepared.hashes[0]
    clock = tree.clock
    assert peek_cached_blocks(tree, hashes) == tree.match_prefix(hashes).num_blocks
    assert peek_cached_blocks(tree, hashes[:10]) == 10
    assert tree.clock == clock + 1  # only match_prefix ticked


def test_kv_events_keep_the_gateway_index_equal_to_the_caches() -> None:
    prepared = PreparedTrace(generate("rag", seed=2, num_requests=150, request_rate=30.0))
    sim = _run(prepared, "kv_aware", replicas=3, num_blocks=1500)
    for replica, load in zip(sim.replicas, sim.gateway.loads, strict=True):
        index = sim.gateway.index.exact_index(load.replica_id)
        assert set(index) == replica.tree.cached_block_hashes()
        assert not index.needs_resync


def test_cache_aware_policies_hit_more_than_round_robin_on_agents() -> None:
    prepared = PreparedTrace(generate("agent", seed=0, num_tasks=20))
    hits = {
        policy: simulate(
            prepared, SimulationConfig(num_replicas=4, policy=policy, replica=SMALL_REPLICA)
        ).delivered_hit_rate
        for policy in ("round_robin", "kv_aware", "oracle")
    }
    assert hits["kv_aware"] > hits["round_robin"] + 0.05
    assert hits["oracle"] > hits["round_robin"] + 0.05


@pytest.mark.parametrize("card", [H100_80GB, H200])
def test_latency_constants_are_the_ones_the_result_files_give(card) -> None:
    """The offline figures give the constants; where a served run's step logs are a source too,
    they give the KV read cost (at the fixed point: fitted again with the card's own base and
    per-row costs, they return it)."""
    offline, *served = (RESULTS / Path(name).name for name in card.source.split(" + "))
    kv_ms = None
    if served:
        kv_ms = card.kv_read_ms_per_token
        assert served_kv_ms(served[0], card) == pytest.approx(kv_ms, rel=2e-3)
    assert card.dedup_shared_kv == (kv_ms is None)
    derived = derive(offline, card.seq_ms, card.card, kv_ms)
    for name in ("step_base_ms", "token_ms", "context_pair_ms", "self_pair_ms", "kv_read_ms_per_token"):
        assert getattr(derived, name) == pytest.approx(getattr(card, name), rel=1e-4), name
    assert json.loads(offline.read_text())["card"] == card.card


def test_bench_simulate_command_writes_json_and_markdown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace_path = tmp_path / "agent.jsonl"
    assert (
        main(
            [
                "bench",
                "workload",
                "--workload",
                "agent",
                "--seed",
                "3",
                "--set",
                "num_tasks=6",
                "--out",
                str(trace_path),
            ]
        )
        == 0
    )
    code = main(
        [
            "bench", "simulate", "--trace", str(trace_path), "--replicas", "1,2",
            "--policies", ",".join(POLICIES), "--num-blocks", "3000", "--out", str(tmp_path), "--name", "run",
        ]
    )  # fmt: skip
    assert code == 0
    data = json.loads((tmp_path / "run.json").read_text())
    assert data["trace"]["seed"] == 3 and data["trace"]["workload"] == "agent"
    assert [(r["num_replicas"], r["policy"]) for r in data["results"]] == [
        (n, p) for n in (1, 2) for p in POLICIES
    ]
    assert all(r["num_requests"] == data["trace"]["num_requests"] for r in data["results"])
    markdown = (tmp_path / "run.md").read_text()
    assert "| 2 | oracle |" in markdown and "seed 3" in markdown
    assert main(["bench", "simulate", "--workload", "rag", "--set", "bogus=1", "--out", str(tmp_path)]) == 2
    assert "bad --set" in capsys.readouterr().err


@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "oracle"])
def test_policies_decide_as_the_gateway_does_for_the_same_state(policy: str) -> None:
    """SimGateway.choose against gateway/pool.py ModelPool.choose, both starting from the same
    index contents (a snapshot of simulated caches) and loads, then routing the same requests."""
    from engine.server.protocol import LoadReport, LoadSnapshot, ReplicaInfo
    from gateway.pool import HEALTHY, ModelPool, Replica
    from policies.routing import routing_policy

    prepared = PreparedTrace(generate("agent", seed=5, num_tasks=12))
    sim = _run(prepared, "kv_aware", replicas=4, num_blocks=2500)
    info = ReplicaInfo(
        model="m", aliases=[], model_id="sim/llama3-8b", block_size=16, max_model_len=1 << 16,
        vocab_size=LLAMA3_VOCAB, default_max_tokens=16, model_folder="",
    )  # fmt: skip
    pool = ModelPool(
        "m",
        info,
        None,
        routing_policy(policy),
        ttl_s=120.0,
        approximate_max_blocks=1 << 18,
        max_sessions=100_000,
    )  # type: ignore[arg-type]
    ours_gateway = SimGateway(sim.replicas, routing_policy(policy), 16)
    for i, (replica, load) in enumerate(zip(sim.replicas, ours_gateway.loads, strict=True)):
        # Distinct loads so that load-aware policies have something to weigh.
        load.in_flight, load.prefill_queued, load.running, load.waiting = i % 3, 500 * i, i, i % 2
        load.kv_usage = 0.1 * i
        gw = Replica(
            url=load.replica_id, status=HEALTHY, in_flight=load.in_flight, prefill_queued=load.prefill_queued
        )
        gw.load = LoadReport(
            model="m", in_flight=0, max_in_flight=256,
            engine=LoadSnapshot(
                running=load.running, waiting=load.waiting, num_blocks=2500, free_blocks=0, cached_blocks=0,
                used_blocks=0, kv_usage=load.kv_usage, num_preemptions=0, prompt_tokens_admitted=0,
                cached_tokens_admitted=0, steps=0, kv_events_dropped=0,
            ),
        )  # fmt: skip
        pool.join(gw)
        for index in (pool.index, ours_gateway.index):
            index.exact_index(gw.url).load_snapshot(replica.tree.cached_block_hashes(), 0)
    decided = 0
    for i, spec in enumerate(prepared.trace.requests[:60]):
        request = SimRequest(
            spec.request_id,
            10_000 + i,
            prepared.tokens[i],
            prepared.hashes[i],
            spec.prompt_len,
            spec.output_len,
            0.0,
        )
        prompt_hashes = prepared.hashes[i][: spec.prompt_len // 16]
        _, ours = ours_gateway.choose(request, prompt_hashes, spec.session_id, 0.0)
        route = pool.choose(prepared.tokens[i][: spec.prompt_len].tolist(), None, spec.session_id)
        assert route.block_hashes == prompt_hashes
        theirs = route.decision
        assert (ours.replica_id, ours.reason, ours.predicted_cached_tokens) == (
            theirs.replica_id, theirs.reason, theirs.predicted_cached_tokens,
        )  # fmt: skip
        assert ours.scores == theirs.scores
        # The proxy's accounting after a routing decision (gateway/proxy.py).
        route.replica.in_flight += 1
        route.replica.prefill_queued += max(spec.prompt_len - theirs.predicted_cached_tokens, 0)
        pool.inflight.add(route.replica.url, route.block_hashes)
        decided += 1
    assert decided == 60


def _sim_request(name: str, prompt_len: int, computed: int, generated: int = 0) -> SimRequest:
    return SimRequest(
        request_id=name,
        arrival_seq=0,
        token_ids=np.zeros(prompt_len + 8, dtype=np.uint32),
        block_hashes=[],
        prompt_len=prompt_len,
        output_len=8,
        arrival_s=0.0,
        generated=generated,
        num_computed_tokens=computed,
    )


def test_step_time_follows_how_the_engine_runs_the_step() -> None:
    """Graph and piecewise steps cost what the model says (piecewise over its bucket's padded
    rows); an eager step at least its launch; an earlier engine's split steps two replays."""
    model = replace(H200, eager_launch_ms=100.0)
    replica = SimReplica(0, ReplicaConfig(max_batched_tokens=4096), model)

    def decodes(n: int) -> dict[SimRequest, int]:
        return {_sim_request(f"d{i}", 100, 100, generated=1): 1 for i in range(n)}

    def ms(chunks: dict[SimRequest, int], on: SimReplica = replica) -> float:
        return on._step_seconds(chunks, 1) * 1000

    short, long = _sim_request("short", 300, 0), _sim_request("long", 600, 0)
    three = decodes(3)
    alone = model.step_ms(300, 1, 0.0, 300 * 300 / 2, 0)
    assert ms(three) == pytest.approx(model.step_ms(3, 3, 0.0, 0.0, 300))
    assert ms({short: 300}) == pytest.approx(alone)
    # 303 tokens run as the 320-token bucket.
    assert ms({**three, short: 300}) == pytest.approx(model.step_ms(320, 4, 0.0, 300 * 300 / 2, 300))
    assert ms({**three, long: 600}) == pytest.approx(model.step_ms(640, 4, 0.0, 600 * 600 / 2, 300))
    big = _sim_request("big", 2100, 0)
    assert ms({**three, big: 2100}) == pytest.approx(100.0)  # past the largest bucket: eager
    split = SimReplica(1, ReplicaConfig(rules=SPLIT_ENGINE), model)
    assert ms({**three, short: 300}, split) == pytest.approx(model.step_ms(3, 3, 0.0, 0.0, 300) + alone)
    assert ms({**decodes(65), short: 300}, split) == pytest.approx(100.0)  # past the split limit
    eager = SimReplica(2, ReplicaConfig(rules=EAGER_ENGINE), model)
    assert ms({**three, short: 300}, eager) == pytest.approx(100.0)


def test_cached_context_costs_the_split_kernel_rate_only_in_small_batches() -> None:
    """128 new tokens on 8,192 cached run the split-KV kernel (the rate context_pair_ms was
    fitted on); a 4,000-token chunk fills the GPU's query tiles and runs the unsplit kernel,
    where a pair with a cached key costs a causal pair's price."""
    replica = SimReplica(0, ReplicaConfig(), H200)
    small, big = _sim_request("small", 8320, 8192), _sim_request("big", 12000, 4000)
    assert replica._step_seconds({small: 128}, 1) * 1000 == pytest.approx(
        H200.step_ms(128, 1, 128 * 8192, 128 * 128 / 2, 0)
    )
    expected_big = H200.step_ms(4000, 1, 0.0, 4000 * 4000 / 2 + 4000 * 4000, 0)
    assert replica._step_seconds({big: 4000}, 1) * 1000 == pytest.approx(
        max(expected_big, H200.eager_launch_ms)
    )


def test_the_simulated_piecewise_limit_is_the_engine_s() -> None:
    from engine.piecewise_graphs import PIECEWISE_BUCKETS

    assert PIECEWISE_BUCKETS[-1] == PIECEWISE_ENGINE.piecewise_max_tokens
