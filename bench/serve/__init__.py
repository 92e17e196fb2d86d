"""The load driver: replay a workload trace against an OpenAI-compatible server and measure it.

`prefixgate bench serve --base-url URL --workload NAME | --trace FILE [--request-rate R]` on the
command line; from Python (e.g. to compare routers over simulated replicas):

    from bench.serve import ServeConfig, run_benchmark, run_sweep, make_report, write_report
    from bench.workloads import generate

    trace = generate("generated-shared-prefix", seed=0, num_groups=4, prompts_per_group=8)
    config = ServeConfig(base_url="http://127.0.0.1:8080", request_rate=8.0, label="kv_aware",
                         slo_ms={"ttft": 500.0, "tpot": 50.0})
    result = run_benchmark(trace, config)          # one BenchmarkResult (a msgspec Struct)
    print(result.metrics.ttft_ms.p99, result.cache.hit_rate, result.gateway)
    runs = run_sweep(trace, config, [2.0, 4.0, 8.0])  # one run per rate, fresh prefixes each
    write_report("bench/results", "serve-gsp-kv_aware", make_report(runs))

Inside a running event loop use `await run_benchmark_async(trace, config)`. Metric definitions
(vLLM's) are in `bench/serve/metrics.py`; arrivals and prompts in `plan.py`; the streaming
client in `driver.py`; the gateway's /metrics diff in `gateway_stats.py`; JSON and markdown in
`report.py`; figures in `plots.py` (`plot_reports([read_report(p) for p in paths], out_dir)`).

Token ids: traces are token-id recipes and go to /v1/completions as token ids, folded into the
model's vocabulary (from `tokenizer` / `vocab_size`, else the embedded model's tokenizer when
it is on disk, else the trace's own); `endpoint="chat"` decodes them to text with the tokenizer.
"""

from bench.serve.driver import ServeConfig, run_benchmark, run_benchmark_async, run_sweep
from bench.serve.metrics import LatencyStats, RequestOutcome, ServeMetrics, compute_metrics, parse_slo
from bench.serve.plan import arrival_times, plan_requests
from bench.serve.report import BenchmarkResult, ServeReport, make_report, markdown, read_report, write_report

__all__ = [
    "BenchmarkResult",
    "LatencyStats",
    "RequestOutcome",
    "ServeConfig",
    "ServeMetrics",
    "ServeReport",
    "arrival_times",
    "compute_metrics",
    "make_report",
    "markdown",
    "parse_slo",
    "plan_requests",
    "read_report",
    "run_benchmark",
    "run_benchmark_async",
    "run_sweep",
    "write_report",
]
