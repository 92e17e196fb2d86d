"""matplotlib figures from one or more serve reports (labels, e.g. routing policies).

- latency_vs_rate.png: TTFT, TPOT, ITL and E2E latency (p50 solid, p90 dashed, p99 dotted)
  against the request rate, one colour per label; an infinite rate sits right of the others.
- hit_rate.png: per label and rate, the hit rate from the responses' cached_tokens and the
  gateway's predicted and delivered hit rates.
- replica_load.png: each replica's share of requests and of prompt tokens, per label and rate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from bench.serve.report import BenchmarkResult, ServeReport

_METRICS = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2el_ms", "E2E latency"))
_PERCENTILES = (("median", "-", "p50"), ("p90", "--", "p90"), ("p99", ":", "p99"))


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _rate_positions(runs: Sequence[BenchmarkResult]) -> tuple[dict[str, float], list[float], list[str]]:
    """x position per rate label; 'inf' and 'trace' go right of the largest finite rate."""
    finite = sorted({float(r.request_rate) for r in runs if not isinstance(r.request_rate, str)})
    top = finite[-1] if finite else 1.0
    positions = {f"{rate:g}": rate for rate in finite}
    step = top * 0.25 if finite else 1.0
    for n, name in enumerate(sorted({r.request_rate for r in runs if isinstance(r.request_rate, str)})):
        positions[str(name)] = top + step * (n + 1)
    ticks = sorted(positions.items(), key=lambda kv: kv[1])
    return positions, [x for _, x in ticks], [name for name, _ in ticks]


def _rate_name(run: BenchmarkResult) -> str:
    return run.request_rate if isinstance(run.request_rate, str) else f"{float(run.request_rate):g}"


def plot_latency_vs_rate(reports: Sequence[ServeReport], path: Path) -> Path:
    plt = _pyplot()
    runs = [run for report in reports for run in report.runs]
    positions, ticks, names = _rate_positions(runs)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (field, title), ax in zip(_METRICS, axes.flat, strict=True):
        for n, report in enumerate(reports):
            ordered = sorted(report.runs, key=lambda r: positions[_rate_name(r)])
            xs = [positions[_rate_name(r)] for r in ordered]
            for stat, style, pname in _PERCENTILES:
                ys = [getattr(getattr(r.metrics, field), stat) for r in ordered]
                ax.plot(
                    xs,
                    ys,
                    style,
                    marker="o",
                    color=colours[n % len(colours)],
                    label=f"{report.label} {pname}",
                )
        ax.set_title(f"{title} (ms)")
        ax.set_xlabel("request rate (req/s)")
        ax.set_xticks(ticks, names)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_hit_rate(reports: Sequence[ServeReport], path: Path) -> Path:
    plt = _pyplot()
    groups = [(f"{run.label}\n@{_rate_name(run)}", run) for report in reports for run in report.runs]
    series = (
        ("responses", lambda r: r.cache.hit_rate),
        ("predicted", lambda r: r.gateway.predicted_hit_rate if r.gateway else math.nan),
        ("delivered", lambda r: r.gateway.delivered_hit_rate if r.gateway else math.nan),
    )
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(groups) + 2), 4.5))
    width = 0.8 / len(series)
    for k, (name, value) in enumerate(series):
        xs = [i + (k - 1) * width for i in range(len(groups))]
        ax.bar(xs, [value(run) for _, run in groups], width, label=name)
    ax.set_xticks(range(len(groups)), [name for name, _ in groups], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("cache hit rate (cached / prompt tokens)")
    ax.set_title("Prefix cache hit rate per label")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_replica_load(reports: Sequence[ServeReport], path: Path) -> Path | None:
    runs = [run for report in reports for run in report.runs if run.gateway and run.gateway.replicas]
    if not runs:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), squeeze=False)
    replicas = sorted({r.replica for run in runs for r in run.gateway.replicas})  # type: ignore[union-attr]
    width = 0.8 / len(replicas)
    for ax, (field, title) in zip(
        axes.flat, (("request_share", "requests"), ("prompt_token_share", "prompt tokens")), strict=True
    ):
        for k, replica in enumerate(replicas):
            shares = []
            for run in runs:
                found = [r for r in run.gateway.replicas if r.replica == replica]  # type: ignore[union-attr]
                shares.append(getattr(found[0], field) if found else 0.0)
            ax.bar(
                [i + (k - (len(replicas) - 1) / 2) * width for i in range(len(runs))],
                shares,
                width,
                label=replica,
            )
        ax.set_xticks(range(len(runs)), [f"{run.label}\n@{_rate_name(run)}" for run in runs], fontsize=8)
        ax.set_title(f"share of {title} per replica")
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_reports(reports: Sequence[ServeReport], out_dir: str | Path, prefix: str = "") -> list[Path]:
    """Write every figure the reports allow into `out_dir`; returns the files written."""
    if not reports:
        raise ValueError("no reports to plot")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [
        plot_latency_vs_rate(reports, out / f"{prefix}latency_vs_rate.png"),
        plot_hit_rate(reports, out / f"{prefix}hit_rate.png"),
    ]
    load = plot_replica_load(reports, out / f"{prefix}replica_load.png")
    return written + ([load] if load else [])
