"""The load driver (bench/serve): vLLM's metric definitions on hand-computed cases, arrivals,
prompt planning, the gateway metrics diff, and one real run of `prefixgate bench serve`
against a gateway and one replica of the embedded model."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from bench.serve.gateway_stats import diff_stats, parse_metrics
from bench.serve.metrics import RequestOutcome, compute_metrics, latency_stats, parse_slo
from bench.serve.plan import arrival_times, plan_requests
from bench.serve.report import BenchmarkResult, CacheStats, make_report, markdown, read_report, write_report
from bench.workloads import generate
from bench.workloads.trace import Segment, Trace, TraceRequest


def outcome(
    ttft: float, latency: float, tokens: int, itl: tuple[float, ...] = (), **kw: object
) -> RequestOutcome:
    return RequestOutcome(
        request_id=str(kw.get("request_id", "r")),
        success=bool(kw.get("success", True)),
        start_s=float(kw.get("start_s", 0.0)),  # type: ignore[arg-type]
        ttft_s=ttft,
        latency_s=latency,
        itl_s=itl,
        prompt_tokens=int(kw.get("prompt_tokens", 10)),  # type: ignore[call-overload]
        output_tokens=tokens,
    )


def test_tpot_excludes_the_first_token_and_is_zero_for_one_token() -> None:
    assert outcome(0.1, 0.5, 5).tpot_s == pytest.approx(0.1)  # (0.5 - 0.1) / (5 - 1)
    assert outcome(0.2, 0.2, 1).tpot_s == 0.0
    assert outcome(0.2, 0.2, 0).tpot_s == 0.0


def test_run_metrics_match_hand_computed_values() -> None:
    runs = [
        outcome(0.1, 0.5, 5, (0.1, 0.1, 0.2), start_s=0.0, prompt_tokens=100),
        outcome(0.3, 0.3, 1, (), start_s=0.2, prompt_tokens=50),  # one token: no TPOT sample
        outcome(0.2, 1.0, 3, (0.4, 0.4), start_s=1.0, prompt_tokens=20),
        outcome(0.0, 0.0, 0, success=False, start_s=0.1),
    ]
    m = compute_metrics(runs, duration_s=2.0)
    assert (m.completed, m.failed) == (3, 1)
    assert (m.total_input_tokens, m.total_output_tokens) == (170, 9)  # failures count nothing
    assert m.request_throughput == pytest.approx(1.5)
    assert m.output_throughput == pytest.approx(4.5)
    assert m.total_token_throughput == pytest.approx(89.5)
    assert m.ttft_ms.mean == pytest.approx(200.0) and m.ttft_ms.median == pytest.approx(200.0)
    # TPOT over requests with > 1 token only: 0.1 s and (1.0 - 0.2) / 2 = 0.4 s.
    assert m.tpot_ms.count == 2 and m.tpot_ms.mean == pytest.approx(250.0)
    # ITL pools every gap of every request: 0.1, 0.1, 0.2, 0.4, 0.4.
    assert (
        m.itl_ms.count == 5
        and m.itl_ms.mean == pytest.approx(240.0)
        and m.itl_ms.median == pytest.approx(200.0)
    )
    assert m.e2el_ms.p90 == pytest.approx(900.0)  # linear between 0.5 and 1.0 s
    assert m.request_goodput is None and m.good_requests is None
    # Requests 1 and 2 overlap (0.0-0.5 and 0.2-0.5); request 3 starts at 1.0.
    assert m.max_concurrent_requests == 2


def test_percentiles_are_numpy_linear_and_empty_is_zero() -> None:
    stats = latency_stats([1.0, 2.0, 3.0, 4.0])
    assert stats.median == pytest.approx(2500.0)
    assert stats.p90 == pytest.approx(3700.0)
    assert stats.p99 == pytest.approx(3970.0)
    assert stats.std == pytest.approx(1000.0 * float(np.std([1, 2, 3, 4])))
    empty = latency_stats([])
    assert (empty.mean, empty.p99, empty.count) == (0.0, 0.0, 0)


def test_goodput_counts_requests_meeting_every_slo() -> None:
    runs = [
        outcome(0.1, 0.5, 5),  # ttft 100 ms, tpot 100 ms, e2el 500 ms
        outcome(0.3, 0.3, 1),  # ttft 300 ms, tpot 0 (one token), e2el 300 ms
        outcome(0.2, 1.0, 3),  # ttft 200 ms, tpot 400 ms
    ]
    assert compute_metrics(runs, 1.0, {"ttft": 200.0}).good_requests == 2  # <= counts as met
    assert compute_metrics(runs, 1.0, {"tpot": 100.0}).good_requests == 2
    both = compute_metrics(runs, 2.0, parse_slo("ttft_ms=250,tpot_ms=150"))
    assert both.good_requests == 1 and both.request_goodput == pytest.approx(0.5)
    assert compute_metrics(runs, 1.0, {"e2el": 400.0}).good_requests == 1


def test_parse_slo_accepts_both_spellings_and_rejects_junk() -> None:
    assert parse_slo("ttft_ms=500, tpot_ms=50,e2el_ms=3000") == {"ttft": 500.0, "tpot": 50.0, "e2el": 3000.0}
    assert parse_slo("ttft:500 tpot:50") == {"ttft": 500.0, "tpot": 50.0}
    assert parse_slo("") == {}
    for bad in ("latency_ms=3", "ttft_ms=fast", "ttft_ms=-1", "ttft"):
        with pytest.raises(ValueError, match="bad SLO"):
            parse_slo(bad)


def test_arrivals_follow_the_rate_and_are_reproducible() -> None:
    times = arrival_times(1000, rate=20.0, seed=1)
    assert times == sorted(times) and times[-1] == pytest.approx(50.0)  # n / rate, as vLLM scales
    assert times == arrival_times(1000, rate=20.0, seed=1)
    assert times != arrival_times(1000, rate=20.0, seed=2)
    assert arrival_times(5, rate=math.inf) == [0.0] * 5
    assert arrival_times(4, rate=2.0, burstiness=math.inf) == pytest.approx([0.5, 1.0, 1.5, 2.0])
    with pytest.raises(ValueError):
        arrival_times(3, rate=0.0)
    with pytest.raises(ValueError):
        arrival_times(3, rate=1.0, burstiness=0.0)


def test_burstiness_is_the_gamma_shape_of_the_gaps() -> None:
    def spread(burstiness: float) -> float:  # coefficient of variation of the gaps: 1 / sqrt(shape)
        gaps = np.diff([0.0, *arrival_times(20000, rate=10.0, burstiness=burstiness, seed=3)])
        return float(np.std(gaps) / np.mean(gaps))

    assert spread(1.0) == pytest.approx(1.0, rel=0.05)  # Poisson
    assert spread(0.25) == pytest.approx(2.0, rel=0.08)  # burstier
    assert spread(4.0) == pytest.approx(0.5, rel=0.05)  # more even


def test_plan_folds_ids_keeps_sharing_and_salts_for_fresh_prefixes() -> None:
    trace = generate(
        "generated-shared-prefix", seed=0, num_groups=2, prompts_per_group=3, system_prompt_len=64
    )
    plan = plan_requests(trace, endpoint="completions", vocab_size=1000, tokenizer=None, request_rate=None)
    ids = [np.array(plan.prompt(p)) for p in plan.requests]
    assert all(a.min() >= 256 and a.max() < 1000 for a in ids)
    assert np.array_equal(ids[0][:64], ids[2][:64]) and not np.array_equal(ids[0][:64], ids[3][:64])
    assert [p.max_tokens for p in plan.requests] == [trace.requests[0].output_len] * 6
    salted = plan_requests(
        trace, endpoint="completions", vocab_size=1000, tokenizer=None, request_rate=None, key_salt=1
    )
    other = [np.array(salted.prompt(p)) for p in salted.requests]
    assert np.array_equal(other[0][:64], other[2][:64]) and not np.array_equal(other[0][:64], ids[0][:64])


def test_plan_keeps_session_order_and_think_time_unless_a_rate_is_given() -> None:
    first = TraceRequest(
        request_id="a", prompt=[Segment(1, 20)], output_len=4, output_key=9, session_id="s", arrival_s=0.5
    )
    second = TraceRequest(
        request_id="b", prompt=[Segment(1, 20), Segment(9, 4)], output_len=4, output_key=10,
        session_id="s", after=["a"], think_time_s=2.0,
    )  # fmt: skip
    trace = Trace(generate("random", num_requests=1).header, (first, second))
    own = plan_requests(trace, endpoint="completions", vocab_size=None, tokenizer=None, request_rate=None)
    assert [(p.arrival_s, p.after, p.think_time_s, p.session_id) for p in own.requests] == [
        (0.5, (), 0.0, "s"),
        (None, ("a",), 2.0, "s"),
    ]
    rated = plan_requests(
        trace, endpoint="completions", vocab_size=None, tokenizer=None, request_rate=4.0, seed=5
    )
    assert rated.requests[1].after == ("a",) and rated.requests[1].think_time_s == 0.0
    assert rated.requests[1].arrival_s == pytest.approx(0.5)  # n / rate
    with pytest.raises(ValueError, match="tokenizer"):
        plan_requests(trace, endpoint="chat", vocab_size=None, tokenizer=None, request_rate=None)


def test_gateway_counters_diff_into_hit_rates_and_per_replica_load() -> None:
    from gateway.metrics import GatewayMetrics  # the gateway's own exporter, no process needed

    metrics = GatewayMetrics()
    metrics.requests.labels("http://a", "ok").inc(3)
    metrics.prompt_tokens.labels("http://a").inc(300)
    before = parse_metrics(metrics.render()[0].decode())
    metrics.requests.labels("http://a", "ok").inc(2)
    metrics.requests.labels("http://b", "ok").inc(5)
    metrics.requests.labels("http://b", "error").inc(1)
    metrics.prompt_tokens.labels("http://a").inc(200)
    metrics.prompt_tokens.labels("http://b").inc(600)
    metrics.predicted_cached.labels("http://a").inc(100)
    metrics.predicted_cached.labels("http://b").inc(480)
    metrics.delivered_cached.labels("http://a").inc(100)
    metrics.delivered_cached.labels("http://b").inc(400)
    metrics.decisions.labels("kv_aware", "cache_hit").inc(8)
    stats = diff_stats(before, parse_metrics(metrics.render()[0].decode()))
    assert stats.policies == {"kv_aware": 8} and stats.reasons == {"cache_hit": 8}
    assert (stats.requests, stats.prompt_tokens) == (8, 800)
    assert stats.predicted_hit_rate == pytest.approx(580 / 800)
    assert stats.delivered_hit_rate == pytest.approx(500 / 800)
    a, b = stats.replicas
    assert (a.replica, a.requests, a.prompt_tokens, a.delivered_hit_rate) == ("http://a", 2, 200, 0.5)
    assert b.requests_by_outcome == {"error": 1, "ok": 5} and b.request_share == pytest.approx(6 / 8)
    assert b.predicted_hit_rate == pytest.approx(0.8)


def _result(label: str, rate: float | str, gateway: object) -> BenchmarkResult:
    runs = [outcome(0.1, 0.5, 5, (0.1, 0.1, 0.2)), outcome(0.3, 0.9, 3, (0.3, 0.3))]
    return BenchmarkResult(
        label=label, started_at="2026-11-28T00:00:00+00:00", base_url="http://x", endpoint="completions",
        model="m", workload="generated-shared-prefix", trace_seed=0, num_requests=2, request_rate=rate,
        burstiness=1.0, max_concurrency=None, slo_ms={}, metrics=compute_metrics(runs, 1.0),
        cache=CacheStats(prompt_tokens=20, cached_tokens=10, hit_rate=0.5, requests_reporting=2),
        gateway=gateway, errors=[],  # type: ignore[arg-type]
    )  # fmt: skip


def test_reports_round_trip_and_plot_several_labels(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from bench.serve.gateway_stats import GatewayStats, ReplicaLoad
    from bench.serve.plots import plot_reports

    load = ReplicaLoad(
        replica="http://r0", requests=2, requests_by_outcome={"ok": 2}, request_share=1.0, prompt_tokens=20,
        prompt_token_share=1.0, predicted_cached_tokens=12, delivered_cached_tokens=10,
        predicted_hit_rate=0.6, delivered_hit_rate=0.5, retries=0,
    )  # fmt: skip
    stats = GatewayStats(
        policies={"kv_aware": 2}, reasons={"cache_hit": 2}, requests=2, prompt_tokens=20,
        predicted_cached_tokens=12, delivered_cached_tokens=10, predicted_hit_rate=0.6,
        delivered_hit_rate=0.5, replicas=[load],
    )  # fmt: skip
    kv = make_report(
        [_result("kv_aware", 1.0, stats), _result("kv_aware", 2.0, stats), _result("kv_aware", "inf", stats)]
    )
    rr = make_report([_result("round_robin", 1.0, None), _result("round_robin", "inf", None)])
    json_path, md_path = write_report(tmp_path, "kv", kv)
    assert read_report(json_path) == kv
    assert "| kv_aware | inf | - | 2 / 0 |" in md_path.read_text()
    table = markdown([kv, rr])
    assert "| round_robin | 1 |" in table and "| kv_aware | 2 | http://r0 | 2 |" in table
    written = plot_reports([kv, rr], tmp_path / "plots", prefix="cmp-")
    assert [p.name for p in written] == [
        "cmp-latency_vs_rate.png",
        "cmp-hit_rate.png",
        "cmp-replica_load.png",
    ]
    assert all(p.stat().st_size > 10_000 for p in written)


# --- one real run: gateway + one replica of the embedded model -------------------------------


def _procs() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "gateway" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_serve_driver_test_procs", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gateway_url(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    procs = _procs()
    started = []
    try:
        replica = procs.Proc(
            procs.ENGINE_ARGS, procs.free_port(), tmp_path_factory.mktemp("serve-replica") / "engine.log",
            env={"OMP_NUM_THREADS": "2"},
        )  # fmt: skip
        started.append(replica.start())
        replica.wait_ready()
        gateway = procs.Proc(
            ["gateway", "--log-level", "warning", "--replica", replica.url],
            procs.free_port(),
            tmp_path_factory.mktemp("serve-gateway") / "gateway.log",
        )
        started.append(gateway.start())
        gateway.wait_ready(60)
        yield gateway.url
    finally:
        for proc in reversed(started):
            proc.stop()


@pytest.mark.slow
def test_bench_serve_against_a_real_gateway(gateway_url: str, tmp_path: Path) -> None:
    from prefixgate.cli import main

    workload = [
        "--workload", "generated-shared-prefix", "--set", "num_groups=3", "--set", "prompts_per_group=4",
        "--set", "system_prompt_len=64", "--set", "question_len=16", "--set", "output_len=3",
    ]  # fmt: skip
    code = main(
        ["bench", "serve", "--base-url", gateway_url, *workload, "--request-rate", "inf",
         "--max-concurrency", "3", "--slo", "ttft_ms=600000", "--label", "kv-aware test",
         "--out", str(tmp_path), "--name", "run", "--save-requests", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    report = read_report(tmp_path / "run.json")
    (run,) = report.runs
    m = run.metrics
    assert (run.label, run.num_requests, m.completed, m.failed) == ("kv-aware test", 12, 12, 0)
    records = run.requests
    assert len(records) == 12 and all(r.success and r.cached_tokens is not None for r in records)
    # ignore_eos: every answer has exactly max_tokens tokens, and the totals are the usage sums.
    assert {r.output_tokens for r in records} == {3}
    assert m.total_output_tokens == sum(r.output_tokens for r in records) == 36
    assert m.total_input_tokens == sum(r.prompt_tokens for r in records) == 12 * (64 + 16)
    assert run.cache.cached_tokens == sum(r.cached_tokens or 0 for r in records)
    assert run.cache.hit_rate > 0  # later questions of a group reuse its system prompt
    assert m.good_requests == 12 and m.ttft_ms.count == 12 and m.itl_ms.count > 0
    assert 1 <= m.max_concurrent_requests <= 3
    # The gateway's counters agree with what the responses said.
    gateway = run.gateway
    assert gateway is not None and gateway.policies == {"kv_aware": 12}
    assert gateway.prompt_tokens == m.total_input_tokens
    assert gateway.delivered_cached_tokens == run.cache.cached_tokens
    assert [r.requests for r in gateway.replicas] == [12]
    for name in ("run.md", "run-latency_vs_rate.png", "run-hit_rate.png", "run-replica_load.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert "kv-aware test" in (tmp_path / "run.md").read_text()

    # The chat endpoint, with session ids, replayed from a trace file; then both plotted together.
    trace = generate("multi-turn", seed=1, num_conversations=2, min_turns=2, max_turns=2,
                     system_prompt_len=32, user_len_mean=12, output_len_mean=4, max_len=8,
                     think_time_mean_s=0.05)  # fmt: skip
    trace.write(tmp_path / "chat.jsonl")
    code = main(
        ["bench", "serve", "--base-url", gateway_url, "--trace", str(tmp_path / "chat.jsonl"),
         "--endpoint", "chat", "--out", str(tmp_path), "--name", "chat", "--save-requests",
         "--no-progress", "--no-plots"]
    )  # fmt: skip
    assert code == 0
    chat = read_report(tmp_path / "chat.json").runs[0]
    assert (chat.label, chat.metrics.completed, chat.request_rate) == ("kv_aware", 4, "trace")
    assert [r.output_tokens for r in chat.requests] == [r.output_len for r in trace.requests]
    assert {r.session_id for r in chat.requests} == {r.session_id for r in trace.requests}
    assert (
        main(
            ["bench", "plot", str(tmp_path / "run.json"), str(tmp_path / "chat.json"), "--out", str(tmp_path)]
        )
        == 0
    )
    assert (tmp_path / "serve-compare-hit_rate.png").stat().st_size > 0
