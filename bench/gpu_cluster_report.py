"""bench.gpu_cluster's report: measured figures beside the simulator's, as markdown.

Kept apart from the runner (bench/gpu_cluster.py) so that a report can be re-rendered on any
machine (`python -m bench.gpu_cluster --render REPORT [--serving-path-from CALIBRATION]`).
"""

from __future__ import annotations

from typing import Any


def serving_path_ms(report: dict[str, Any]) -> dict[str, float]:
    """Per workload, the mean time a request spends outside the replica's API before its first
    token (client TTFT - replica TTFT, means over the report's policies): HTTP to the gateway
    and on to the replica, the gateway's templating, tokenizing and routing, the frames back.
    The simulator models the engine only; a calibration run's figure stands in for the rest."""
    gaps: dict[str, list[float]] = {}
    for row in report["rows"]:
        got = row["measured"]
        if "replica_ttft_mean_ms" in got:
            gaps.setdefault(row["workload"], []).append(got["ttft_mean_ms"] - got["replica_ttft_mean_ms"])
    return {workload: sum(values) / len(values) for workload, values in gaps.items()}


def _vs(measured: float, predicted: float, digits: int = 0) -> str:
    return (
        f"{predicted:.{digits}f} ({predicted / measured - 1:+.0%})" if measured else f"{predicted:.{digits}f}"
    )


def markdown(rows: list[dict[str, Any]], serving_path: dict[str, float] | None = None) -> str:
    """Measured figures beside the simulator's (its error in brackets); with `serving_path`
    (serving_path_ms of a calibration run), predicted TTFTs plus that path as well."""
    columns = ["workload", "policy", "req/s", "pred.", "TTFT p50 ms", "pred.", "TTFT p90 ms", "pred."]
    if serving_path:
        columns += ["path ms", "p50 pred. + path", "p90 pred. + path"]
    columns += ["hit rate", "pred."]
    head = "| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|\n"
    lines = []
    for row in rows:
        got, sim = row["measured"], row["predicted"]
        cells = [
            row["workload"],
            row["policy"],
            f"{got['request_throughput']:.2f}",
            _vs(got["request_throughput"], sim["request_throughput"], 2),
            f"{got['ttft_p50_ms']:.0f}",
            _vs(got["ttft_p50_ms"], sim["ttft_p50_ms"]),
            f"{got['ttft_p90_ms']:.0f}",
            _vs(got["ttft_p90_ms"], sim["ttft_p90_ms"]),
        ]
        if serving_path:
            path = serving_path.get(row["workload"], 0.0)
            cells += [
                f"{path:.1f}",
                _vs(got["ttft_p50_ms"], sim["ttft_p50_ms"] + path),
                _vs(got["ttft_p90_ms"], sim["ttft_p90_ms"] + path),
            ]
        cells += [f"{got['hit_rate']:.3f}", f"{sim['hit_rate']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    layers = [
        "",
        "Means, ms: TTFT at the client, the gateway (arrival to first frame), the replica API and",
        "the engine core's queue; the engine's model time per step and its steps; TPOT p50.",
        "",
        "| workload | policy | client TTFT (pred.) | gateway | replica | engine queue "
        "| step ms (pred.) | steps (pred.) | TPOT p50 (pred.) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        got, sim = row["measured"], row["predicted"]
        if "engine_step_mean_ms" not in got:
            continue  # a result file from before the layers were measured
        layers.append(
            f"| {row['workload']} | {row['policy']} | {got['ttft_mean_ms']:.1f} ({sim['ttft_mean_ms']:.1f}) "
            f"| {got['gateway_ttft_mean_ms']:.1f} | {got['replica_ttft_mean_ms']:.1f} "
            f"| {got['engine_queue_mean_ms']:.1f} "
            f"| {got['engine_step_mean_ms']:.2f} ({sim['engine_step_mean_ms']:.2f}) "
            f"| {got['engine_steps']:.0f} ({sim['engine_steps']}) "
            f"| {got['tpot_p50_ms']:.1f} ({sim['tpot_p50_ms']:.1f}) |"
        )
    return head + "\n".join(lines) + "\n" + "\n".join(layers) + "\n"
