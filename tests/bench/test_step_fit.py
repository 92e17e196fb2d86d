"""bench.step_fit and bench.gpu_cluster's report helpers, on the committed 2-GPU H200 runs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from bench.gpu_cluster_report import markdown, serving_path_ms
from bench.simulator.config import PIECEWISE_ENGINE, SPLIT_ENGINE
from bench.simulator.latency import H200
from bench.simulator.step_cost import step_kind, step_ms
from bench.step_fit import decode_fit, price, rules_of, runs_of, summary_table

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
SEED2 = RESULTS / "gpu-cluster-2x-h200-llama3-8b-seed2.json"


def test_steps_split_into_runs_and_the_kind_rule_matches_the_runner() -> None:
    report = json.loads(SEED2.read_text())
    runs = runs_of(report, RESULTS)
    assert set(runs) == {f"{r['workload']}/{r['policy']}" for r in report["rows"]}
    for row in report["rows"]:
        steps = runs[f"{row['workload']}/{row['policy']}"]
        # The engine's own step count (its /metrics) for the run, from both replicas' logs.
        assert len(steps) == pytest.approx(row["measured"]["engine_steps"], rel=0.01)
        assert rules_of(steps) == SPLIT_ENGINE  # logged before piecewise graphs
        assert all(step_kind(r.decodes, r.chunks, SPLIT_ENGINE) == r.kind for r in steps)


def test_the_served_latency_model_prices_a_held_out_run_within_a_few_percent() -> None:
    """H200's KV cost was fitted on the seed-1 run's steps; seed 2's steps are new to it."""
    report = json.loads(SEED2.read_text())
    runs = runs_of(report, RESULTS).items()
    priced = [p for run, records in runs for p in price(records, run, H200, SPLIT_ENGINE)]
    measured = sum(p.record.step_s for p in priced) * 1e3
    assert sum(p.per_row_ms for p in priced) == pytest.approx(measured, rel=0.05)
    assert "| agent/kv_aware | graph |" in summary_table(priced, SPLIT_ENGINE)
    assert "latency model, per row" in decode_fit(priced, H200)


def test_step_ms_prices_each_kind_as_the_runner_runs_it() -> None:
    decode = step_ms(H200, 8, 40_000, ())
    chunk = step_ms(H200, 0, 0.0, [(100, 4000)])
    both = step_ms(H200, 8, 40_000, [(100, 4000)], SPLIT_ENGINE)
    assert both == pytest.approx(decode + chunk)  # an earlier engine's two replays
    assert step_ms(H200, 1, 100, [(20, 0), (20, 0)], SPLIT_ENGINE) == H200.eager_launch_ms  # eager floor
    # Piecewise: one pass over the bucket's padded rows (108 tokens run as 128), or the launch floor.
    assert step_kind(8, [(100, 4000)]) == "piecewise"
    padded = H200.step_ms(128, 9, 100 * 4000, 100 * 100 / 2, 40_000)
    assert step_ms(H200, 8, 40_000, [(100, 4000)], PIECEWISE_ENGINE) == pytest.approx(padded)
    assert padded < both
    slow_host = dataclasses.replace(H200, piecewise_launch_ms=50.0)
    assert step_ms(slow_host, 1, 100, [(20, 0), (20, 0)]) == 50.0
    assert step_kind(0, [(1500, 0), (1000, 0)]) == "eager"  # past the largest bucket


def test_serving_path_and_markdown_put_the_prediction_beside_the_measurement() -> None:
    seed1 = json.loads((RESULTS / "gpu-cluster-2x-h200-llama3-8b-seed1.json").read_text())
    path = serving_path_ms(seed1)
    assert set(path) == {"agent", "rag"} and all(0 < ms < 50 for ms in path.values())
    rows = json.loads(SEED2.read_text())["rows"]
    text = markdown(rows, path)
    first = text.splitlines()[2]
    predicted = rows[0]["predicted"]["ttft_p50_ms"] + path[rows[0]["workload"]]
    assert f"| {predicted:.0f} (" in first
    assert "p50 pred. + path" not in markdown(rows)
