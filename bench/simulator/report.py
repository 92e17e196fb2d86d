"""A sweep of policies x replica counts over one trace, written as JSON and a markdown table."""

from __future__ import annotations

import platform
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import msgspec

from bench.simulator.config import ReplicaConfig
from bench.simulator.latency import LatencyModel
from bench.simulator.metrics import RunSummary
from bench.simulator.sim import PreparedTrace, SimulationConfig, simulate
from bench.workloads.trace import Trace


@dataclass(frozen=True)
class Sweep:
    replica_counts: tuple[int, ...]
    policies: tuple[str, ...]
    replica: ReplicaConfig
    latency: LatencyModel


def shareable_fraction(prepared: PreparedTrace) -> float:
    """Prompt tokens one infinite cache shared by all replicas could serve (trace order): the
    hit rate no router can beat, given which prefixes the trace repeats."""
    seen: set[int] = set()
    hit = total = 0
    size = prepared.block_size
    for request, hashes in zip(prepared.trace.requests, prepared.hashes, strict=True):
        usable = (request.prompt_len - 1) // size
        k = 0
        while k < usable and hashes[k] in seen:
            k += 1
        hit += k * size
        total += request.prompt_len
        seen.update(hashes)
    return hit / total if total else 0.0


def run_sweep(
    prepared: PreparedTrace, sweep: Sweep, progress: Callable[[str], None] | None = None
) -> list[RunSummary]:
    results = []
    for count in sweep.replica_counts:
        for policy in sweep.policies:
            config = SimulationConfig(
                num_replicas=count, policy=policy, replica=sweep.replica, latency=sweep.latency
            )
            summary = simulate(prepared, config)
            results.append(summary)
            if progress is not None:
                progress(row(summary))
    return results


def row(s: RunSummary) -> str:
    return (
        f"| {s.num_replicas} | {s.policy} | {s.request_throughput:,.2f} | {s.output_throughput:,.0f} "
        f"| {s.ttft_ms.median:,.1f} | {s.ttft_ms.p90:,.1f} | {s.ttft_ms.p99:,.1f} | {s.tpot_ms.median:,.1f} "
        f"| {s.e2e_ms.p90 / 1000:,.2f} | {s.delivered_hit_rate:.3f} | {s.load_imbalance:.2f} "
        f"| {s.preemptions} | {s.wall_s:.1f} |"
    )


HEADER = (
    "| replicas | policy | req/s | output tok/s | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms | TPOT p50 ms "
    "| E2E p90 s | delivered hit | load max/mean | preemptions | sim wall s |\n"
    "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def markdown(trace: Trace, sweep: Sweep, results: Sequence[RunSummary], shareable: float) -> str:
    header = trace.header
    lines = [
        f"Trace: {header.workload}, seed {header.seed}, {header.num_requests} requests, "
        f"params {header.params}; shareable prefix fraction (one infinite cache) {shareable:.3f}.",
        f"Replicas: {sweep.replica.num_blocks:,} blocks of {sweep.replica.block_size} tokens, "
        f"max_num_seqs {sweep.replica.max_num_seqs}, max_batched_tokens {sweep.replica.max_batched_tokens}; "
        f"latency model: {sweep.latency.card} ({sweep.latency.source}).",
        f"Simulated on: {platform.machine()} {platform.processor() or platform.system()}, "
        f"Python {platform.python_version()}.",
        "",
        HEADER,
        *(row(s) for s in results),
    ]
    return "\n".join(lines) + "\n"


def write(
    out_dir: str | Path,
    name: str,
    trace: Trace,
    sweep: Sweep,
    results: Sequence[RunSummary],
    shareable: float,
) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "trace": msgspec.to_builtins(trace.header),
        "shareable_fraction": shareable,
        "replica": asdict(sweep.replica),
        "latency": asdict(sweep.latency),
        "machine": {"machine": platform.machine(), "python": platform.python_version()},
        "results": msgspec.to_builtins(list(results)),
    }
    json_path = out / f"{name}.json"
    md_path = out / f"{name}.md"
    json_path.write_bytes(msgspec.json.format(msgspec.json.encode(payload)))
    md_path.write_text(markdown(trace, sweep, results, shareable))
    return json_path, md_path
