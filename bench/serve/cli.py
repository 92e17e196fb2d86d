"""`prefixgate bench serve` (measure a server under a trace) and `prefixgate bench plot`."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

from bench.workloads import WORKLOADS


def add_serve_commands(sub: Any) -> None:
    """Add `serve` and `plot` to the `prefixgate bench` subcommands."""
    serve = sub.add_parser(
        "serve",
        help="replay a trace against a running server; vLLM's TTFT / TPOT / ITL / goodput, hit rates",
    )
    serve.add_argument("--base-url", required=True, help="the server's root URL, e.g. http://127.0.0.1:8080")
    source = serve.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", help="a JSONL trace from `prefixgate bench workload`")
    source.add_argument("--workload", choices=sorted(WORKLOADS), help="generate the trace in place")
    serve.add_argument("--seed", type=int, default=0, help="workload seed, and the seed of drawn arrivals")
    serve.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a workload config field (repeatable)"
    )
    serve.add_argument(
        "--num-requests", type=int, default=None, help="replay only the trace's first N requests"
    )
    serve.add_argument(
        "--request-rate",
        type=float,
        default=None,
        help="requests/s ('inf': all at once); default: the trace's own arrival times",
    )
    serve.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps: 1 = Poisson")
    serve.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    serve.add_argument("--sweep-rates", default=None, help="comma-separated rates: one run each, plotted")
    serve.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    serve.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    serve.add_argument("--slo", default="", help="goodput SLOs, e.g. 'ttft_ms=500,tpot_ms=50,e2el_ms=5000'")
    serve.add_argument(
        "--label", default="", help="name of this configuration (default: the gateway's policy)"
    )
    serve.add_argument(
        "--tokenizer", default=None, help="model folder (vocabulary; text for --endpoint chat)"
    )
    serve.add_argument("--vocab-size", type=int, default=None, help="fold token ids below this")
    serve.add_argument("--max-output-len", type=int, default=None, help="cap the trace's output lengths")
    serve.add_argument("--no-ignore-eos", action="store_true", help="let answers stop at EOS")
    serve.add_argument(
        "--salt",
        type=int,
        default=0,
        help="token-id salt: same sharing structure, other ids, so no earlier run's prompts are cached "
        "(a sweep adds the run's index)",
    )
    serve.add_argument(
        "--api-key", default=os.environ.get("OPENAI_API_KEY"), help="sent as a bearer token ($OPENAI_API_KEY)"
    )
    serve.add_argument("--out", default="bench/results", help="folder for the JSON, markdown and plots")
    serve.add_argument("--name", default=None, help="file name stem (default: serve-<workload>-<label>)")
    serve.add_argument("--save-requests", action="store_true", help="keep per-request records in the JSON")
    serve.add_argument("--no-plots", action="store_true")
    serve.add_argument("--no-progress", action="store_true")

    plot = sub.add_parser("plot", help="plot and tabulate several `bench serve` results together")
    plot.add_argument("reports", nargs="+", help="result JSON files of `prefixgate bench serve`")
    plot.add_argument("--out", default="bench/results", help="folder for the plots and summary table")
    plot.add_argument("--name", default="serve-compare", help="stem of the markdown summary and plot prefix")


def _rates(text: str) -> list[float]:
    rates = [float(part) for part in text.split(",") if part.strip()]
    if not rates or any(not rate > 0 for rate in rates):
        raise ValueError(f"--sweep-rates needs positive rates, got {text!r}")
    return rates


def _stem(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "serve"


def run_serve_bench(args: argparse.Namespace) -> int:
    try:
        if args.bench_command == "plot":
            return _plot(args)
        return _serve(args)
    except (OSError, ValueError, RuntimeError) as err:
        print(f"prefixgate: error: {err}", file=sys.stderr)
        return 2


def _serve(args: argparse.Namespace) -> int:
    from bench.serve.driver import ServeConfig, run_benchmark, run_sweep
    from bench.serve.metrics import parse_slo
    from bench.serve.report import make_report, markdown, write_report
    from bench.simulator.cli import _options
    from bench.workloads import generate
    from bench.workloads.trace import Trace

    if args.trace:
        trace = Trace.read(args.trace)
    else:
        trace = generate(args.workload, seed=args.seed, **_options(args.workload, args.set))
    if args.num_requests is not None:
        if args.num_requests < 1:
            raise ValueError("--num-requests must be >= 1")
        trace = Trace(trace.header, trace.requests[: args.num_requests])
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError("--max-concurrency must be >= 1")
    config = ServeConfig(
        base_url=args.base_url,
        endpoint=args.endpoint,
        model=args.model,
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        seed=args.seed,
        slo_ms=parse_slo(args.slo),
        ignore_eos=not args.no_ignore_eos,
        max_output_len=args.max_output_len,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        label=args.label,
        api_key=args.api_key,
        key_salt=args.salt,
        progress=not args.no_progress,
        keep_requests=args.save_requests,
    )
    if args.request_rate is not None and not args.request_rate > 0:
        raise ValueError("--request-rate must be positive (or inf)")
    runs = (
        run_sweep(trace, config, _rates(args.sweep_rates))
        if args.sweep_rates
        else [run_benchmark(trace, config)]
    )
    report = make_report(runs)
    name = args.name or _stem(f"serve-{trace.header.workload}-{report.label}")
    json_path, md_path = write_report(args.out, name, report)
    print(markdown([report]))
    written = [json_path, md_path]
    if not args.no_plots:
        from bench.serve.plots import plot_reports

        written += plot_reports([report], args.out, prefix=f"{name}-")
    for run in runs:
        if run.errors:
            print(
                f"prefixgate: {run.metrics.failed} failed at rate {run.request_rate}: {run.errors[0]}",
                file=sys.stderr,
            )
    print(f"prefixgate: wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    return 0 if all(run.metrics.completed for run in runs) else 1


def _plot(args: argparse.Namespace) -> int:
    from bench.serve.plots import plot_reports
    from bench.serve.report import markdown, read_report

    reports = [read_report(path) for path in args.reports]
    out = Path(args.out)
    written = plot_reports(reports, out, prefix=f"{_stem(args.name)}-")
    summary = out / f"{_stem(args.name)}.md"
    summary.write_text(markdown(reports))
    print(markdown(reports))
    print(f"prefixgate: wrote {', '.join(str(p) for p in [*written, summary])}", file=sys.stderr)
    return 0
