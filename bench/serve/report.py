"""Results of `prefixgate bench serve`: msgspec Structs, written as JSON and a markdown table.

One report file holds one label's runs (one per request rate of a sweep); `prefixgate bench
plot` reads several to compare labels (e.g. routing policies).
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from bench.serve.gateway_stats import GatewayStats
from bench.serve.metrics import LatencyStats, RequestOutcome, ServeMetrics

REPORT_FORMAT = "prefixgate-serve/1"


class CacheStats(msgspec.Struct, kw_only=True):
    """Hit rate from the responses: usage cached_tokens over prompt_tokens (completed requests)."""

    prompt_tokens: int
    cached_tokens: int
    hit_rate: float
    requests_reporting: int


class RequestRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    request_id: str
    success: bool
    start_s: float
    ttft_ms: float
    e2el_ms: float
    tpot_ms: float
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int | None = None
    session_id: str | None = None
    error: str = ""

    @classmethod
    def of(cls, outcome: RequestOutcome) -> RequestRecord:
        return cls(
            request_id=outcome.request_id,
            success=outcome.success,
            start_s=round(outcome.start_s, 6),
            ttft_ms=round(outcome.ttft_s * 1000, 3),
            e2el_ms=round(outcome.latency_s * 1000, 3),
            tpot_ms=round(outcome.tpot_s * 1000, 3),
            prompt_tokens=outcome.prompt_tokens,
            output_tokens=outcome.output_tokens,
            cached_tokens=outcome.cached_tokens,
            session_id=outcome.session_id,
            error=outcome.error,
        )


class BenchmarkResult(msgspec.Struct, kw_only=True):
    label: str
    started_at: str
    base_url: str
    endpoint: str
    model: str
    workload: str
    trace_seed: int
    num_requests: int
    request_rate: float | str  # requests/s, "inf", or "trace" (the trace's own arrival times)
    burstiness: float
    max_concurrency: int | None
    slo_ms: dict[str, float]
    metrics: ServeMetrics
    cache: CacheStats
    gateway: GatewayStats | None
    errors: list[str]
    requests: list[RequestRecord] = []


class ServeReport(msgspec.Struct, kw_only=True):
    format: str = REPORT_FORMAT
    label: str
    created: str
    machine: str
    runs: list[BenchmarkResult]


def machine_description() -> str:
    return f"{platform.machine()} {platform.system()}, Python {platform.python_version()}, {_cpu_name()}"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def make_report(runs: Sequence[BenchmarkResult], label: str | None = None) -> ServeReport:
    if not runs:
        raise ValueError("no runs to report")
    return ServeReport(
        label=label or runs[0].label,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        machine=machine_description(),
        runs=list(runs),
    )


def read_report(path: str | Path) -> ServeReport:
    report = msgspec.json.decode(Path(path).read_bytes(), type=ServeReport)
    if report.format != REPORT_FORMAT:
        raise ValueError(f"{path}: unknown report format {report.format!r}")
    return report


def write_report(out_dir: str | Path, name: str, report: ServeReport) -> tuple[Path, Path]:
    """`<name>.json` and `<name>.md` in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    json_path.write_bytes(msgspec.json.format(msgspec.json.encode(report), indent=1) + b"\n")
    md_path.write_text(markdown([report]))
    return json_path, md_path


def _pct(value: float) -> str:
    return f"{value:.3f}"


def _ms(stats: LatencyStats) -> str:
    return f"{stats.median:.1f} / {stats.p90:.1f} / {stats.p99:.1f}"


def markdown(reports: Sequence[ServeReport]) -> str:
    """A table of every run (latencies as p50 / p90 / p99 ms), then per-replica load."""
    lines = [
        "| label | rate | conc | ok / failed | req/s | out tok/s | goodput | TTFT ms | TPOT ms | ITL ms "
        "| E2EL ms | hit (responses) | predicted | delivered |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|---|---|---:|---:|---:|",
    ]
    for report in reports:
        for run in report.runs:
            m, g = run.metrics, run.gateway
            rate = run.request_rate if isinstance(run.request_rate, str) else f"{run.request_rate:g}"
            lines.append(
                f"| {run.label} | {rate} | {run.max_concurrency or '-'} | {m.completed} / {m.failed} "
                f"| {m.request_throughput:.2f} | {m.output_throughput:.1f} "
                f"| {'-' if m.request_goodput is None else f'{m.request_goodput:.2f}'} "
                f"| {_ms(m.ttft_ms)} | {_ms(m.tpot_ms)} | {_ms(m.itl_ms)} | {_ms(m.e2el_ms)} "
                f"| {_pct(run.cache.hit_rate)} | {_pct(g.predicted_hit_rate) if g else '-'} "
                f"| {_pct(g.delivered_hit_rate) if g else '-'} |"
            )
    loads = [
        (run, replica)
        for report in reports
        for run in report.runs
        if run.gateway
        for replica in run.gateway.replicas
    ]
    if loads:
        lines += [
            "",
            "| label | rate | replica | requests | share | prompt tokens | predicted hit | delivered hit "
            "| retries |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for run, replica in loads:
            rate = run.request_rate if isinstance(run.request_rate, str) else f"{run.request_rate:g}"
            lines.append(
                f"| {run.label} | {rate} | {replica.replica} | {replica.requests} "
                f"| {replica.request_share:.2f} "
                f"| {replica.prompt_tokens} | {_pct(replica.predicted_hit_rate)} "
                f"| {_pct(replica.delivered_hit_rate)} | {replica.retries} |"
            )
    machines = sorted({report.machine for report in reports})
    lines += ["", f"Measured on {'; '.join(machines)}; latencies are p50 / p90 / p99.", ""]
    return "\n".join(lines)
