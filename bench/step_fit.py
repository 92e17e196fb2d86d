"""The simulator's latency model against real engine steps, one step at a time.

    python -m bench.step_fit bench/results/gpu-cluster-2x-h200-llama3-8b.json [--card h200]

Reads a `bench.gpu_cluster --step-logs` run: the report (each run's wall-clock window) and the
replicas' step logs (engine/step_log.py: what every step held and how long it took). Prices
each logged step with the LatencyModel the way the simulator does (bench/simulator/step_cost.py),
and prints, per run and per kind of step, the measured and predicted mean step times, whether
the simulator's rule picks the kind the runner used, and a least-squares fit of the pure-decode
graph steps (time against decode rows, distinct KV keys and the keys shared rows read again),
which says what a decode step's KV reads really cost where the offline scenarios cannot.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.simulator.config import PIECEWISE_ENGINE, SPLIT_ENGINE, StepRules
from bench.simulator.latency import CARDS, LatencyModel
from bench.simulator.step_cost import step_kind, step_ms
from engine.step_log import StepRecord, read_step_log


def rules_of(records: list[StepRecord]) -> StepRules:
    """The runner's rules when the logs were written: engines before piecewise graphs logged
    "split" steps and never "piecewise" ones."""
    return SPLIT_ENGINE if not any(r.kind == "piecewise" for r in records) else PIECEWISE_ENGINE


@dataclass
class Priced:
    record: StepRecord
    run: str  # "workload/policy"
    dedup_ms: float  # predicted, shared KV blocks read once
    per_row_ms: float  # predicted, every row's keys read


def price(records: list[StepRecord], run: str, latency: LatencyModel, rules: StepRules) -> list[Priced]:
    out = []
    for r in records:
        dedup = step_ms(latency, r.decodes, r.decode_kv_distinct, r.chunks, rules)
        per_row = step_ms(latency, r.decodes, r.decode_kv, r.chunks, rules)
        out.append(Priced(r, run, dedup, per_row))
    return out


def runs_of(report: dict[str, Any], folder: Path) -> dict[str, list[StepRecord]]:
    """Each run's steps from every replica, by the run's wall-clock window."""
    records = [r for name in report["step_logs"] for r in read_step_log(folder / name)]
    runs: dict[str, list[StepRecord]] = {}
    for row in report["rows"]:
        start, end = row["window"]
        runs[f"{row['workload']}/{row['policy']}"] = [r for r in records if start <= r.t <= end]
    return runs


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def summary_table(priced: list[Priced], rules: StepRules) -> str:
    lines = [
        "| run | kind | steps | share of time | measured ms | predicted ms (shared KV once) "
        "| predicted ms (per row) | kind rule agrees |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    by_run: dict[str, list[Priced]] = defaultdict(list)
    for p in priced:
        by_run[p.run].append(p)
    for run, steps in by_run.items():
        total = sum(p.record.step_s for p in steps)
        groups: dict[str, list[Priced]] = defaultdict(list)
        for p in steps:
            groups[p.record.kind].append(p)
        groups["all"] = steps
        for kind, group in groups.items():
            agree = _mean(
                [float(step_kind(p.record.decodes, p.record.chunks, rules) == p.record.kind) for p in group]
            )
            lines.append(
                f"| {run} | {kind} | {len(group)} | {sum(p.record.step_s for p in group) / total:.0%} "
                f"| {_mean([p.record.step_s * 1e3 for p in group]):.2f} "
                f"| {_mean([p.dedup_ms for p in group]):.2f} | {_mean([p.per_row_ms for p in group]):.2f} "
                f"| {agree:.0%} |"
            )
    return "\n".join(lines)


def decode_fit(priced: list[Priced], latency: LatencyModel) -> str:
    """Pure-decode graph steps: ms = a + b x rows + c x distinct keys + d x keys read again."""
    steps = [
        p.record for p in priced if p.record.kind == "graph" and not p.record.chunks and p.record.decodes
    ]
    if len(steps) < 10:
        return "Too few pure-decode graph steps to fit."
    x = np.array([[1.0, r.decodes, r.decode_kv_distinct, r.decode_kv - r.decode_kv_distinct] for r in steps])
    y = np.array([r.step_s * 1e3 for r in steps])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    fitted = x @ coef
    once = np.array([step_ms(latency, r.decodes, r.decode_kv_distinct, ()) for r in steps])
    per_row = np.array([step_ms(latency, r.decodes, r.decode_kv, ()) for r in steps])

    def error(predicted: np.ndarray) -> str:
        return f"{np.median(np.abs(predicted - y) / y):.1%} | {np.mean(predicted - y):+.2f}"

    base, row, key = latency.step_base_ms, latency.token_ms + latency.seq_ms, latency.kv_read_ms_per_token
    return "\n".join(
        [
            f"Pure-decode graph steps: {len(steps)}; rows {min(r.decodes for r in steps)}-"
            f"{max(r.decodes for r in steps)}, keys read {min(r.decode_kv for r in steps):,}-"
            f"{max(r.decode_kv for r in steps):,}, of which shared re-reads "
            f"{_mean([(r.decode_kv - r.decode_kv_distinct) / r.decode_kv for r in steps]):.0%} on average.",
            "",
            f"Measured mean {np.mean(y):.2f} ms.",
            "",
            "| | base ms | ms per row | ms per distinct key | ms per re-read key | median abs error "
            "| mean error ms |",
            "|---|---:|---:|---:|---:|---:|---:|",
            f"| fitted on these steps | {coef[0]:.3f} | {coef[1]:.4f} | {coef[2]:.3e} | {coef[3]:.3e} "
            f"| {error(fitted)} |",
            f"| latency model, shared KV once | {base:.3f} | {row:.4f} | {key:.3e} | 0 | {error(once)} |",
            f"| latency model, per row | {base:.3f} | {row:.4f} | {key:.3e} | {key:.3e} | {error(per_row)} |",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", help="a bench.gpu_cluster JSON report run with --step-logs")
    parser.add_argument("--card", default=None, help="latency model (default: the report's)")
    parser.add_argument("--out", default=None, help="also write the tables to this markdown file")
    args = parser.parse_args(argv)
    path = Path(args.report)
    report = json.loads(path.read_text())
    if not report.get("step_logs"):
        parser.error(f"{path} has no step logs (run bench.gpu_cluster with --step-logs)")
    latency = CARDS[args.card or report["card_model"]]
    runs = runs_of(report, path.parent)
    rules = rules_of([r for records in runs.values() for r in records])
    priced = [p for run, records in runs.items() for p in price(records, run, latency, rules)]
    text = "\n\n".join(
        [
            f"Steps of {path.name} ({report['device']}), priced with the {latency.card} latency model.",
            summary_table(priced, rules),
            decode_fit(priced, latency),
        ]
    )
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
