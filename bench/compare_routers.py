"""Our gateway against sglang-router over the same simulated replicas and trace, in one run.

    python -m bench.compare_routers [--traces agent rag] [--seed 0] [--time-scale 5] [--out bench/results]

For each trace and each router, as real processes on 127.0.0.1: 8 fresh simulated replicas
(`python -m bench.sim_replica`, one process, H100 latency model; fresh caches for every run),
then the router in front of them: our gateway (`prefixgate.cli gateway --policy kv_aware`) or
sglang-router (`python -m sglang_router.launch_router --policy cache_aware`, its defaults
otherwise; `pip install -e '.[bench]'`). The routers run one after the other on the same
trace (bench/workloads, fixed seed), replayed by the same client (bench/sim_replica/replay.py:
streamed chat completions, one message per trace segment, time-scaled arrivals).

Time scale X: the simulated GPUs run X times slower than real time, so this 2-core machine
keeps up; every duration is reported in simulated time (wall / X). Delivered hit rate =
sum(usage cached_tokens) / sum(prompt_tokens). The answers the replicas generate are not the
trace's, so a later turn that quotes an answer misses on those tokens
(on every router alike). Writes compare-routers-<date>.json and .md under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from bench.sim_replica.replay import MODEL, Outcome, Replay
from bench.sim_replica.words import WordVocab
from bench.workloads import generate
from bench.workloads.trace import Trace

ROUTERS = ("prefixgate kv_aware", "sglang-router cache_aware")
# Trace options: sized so 8 simulated H100s are busy (the routing simulator's saturation runs
# use the same shapes; see README "Routing simulator") and a run lasts a few minutes here.
TRACES: dict[str, dict[str, Any]] = {
    "agent": {"num_tasks": 300, "task_rate": 12.0},
    "rag": {"num_requests": 1500, "request_rate": 40.0, "followups_mean": 2.0},
}


# ---- processes ---------------------------------------------------------------------------


def _free_ports(count: int) -> int:
    """The first of `count` consecutive free ports."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = int(s.getsockname()[1])
        if first + count > 65535:
            continue
        ok = True
        for port in range(first + 1, first + count):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return first
    raise RuntimeError(f"no {count} consecutive free ports")


class Processes:
    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with (self.logs / f"{name}.log").open("ab") as out:
            process = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.started.append(process)
        return process

    def stop_all(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.started:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.started.clear()


def _get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def _wait(check: Any, what: str, process: subprocess.Popen[bytes], deadline_s: float = 120.0) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        with contextlib.suppress(OSError, ValueError, KeyError):
            if check():
                return
        time.sleep(0.2)
    raise RuntimeError(f"{what} not ready after {deadline_s:.0f} s")


# ---- one run: fresh replicas, one router, the whole trace -----------------------------------


@dataclass(frozen=True)
class RunSettings:
    replicas: int
    capacity_blocks: int
    time_scale: float
    tokens_per_frame: int
    latency_model: str


def _start_router(procs: Processes, router: str, replica_urls: list[str], logs_tag: str) -> str:
    port = _free_ports(1)
    base = f"http://127.0.0.1:{port}"
    python = sys.executable
    if router.startswith("prefixgate"):
        args = [python, "-m", "prefixgate.cli", "gateway", "--policy", "kv_aware", "--port", str(port)]
        args += ["--log-level", "warning"]
        for url in replica_urls:
            args += ["--replica", url]
        process = procs.spawn(f"gateway-{logs_tag}", args)

        def ready() -> bool:
            rows = _get_json(base + "/admin/replicas")["replicas"]
            return sum(r["status"] == "healthy" for r in rows) == len(replica_urls)

        _wait(ready, "the gateway", process)
    else:
        args = [python, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port)]
        args += ["--policy", "cache_aware", "--prometheus-port", str(_free_ports(1)), "--log-level", "warn"]
        args += ["--worker-urls", *replica_urls]
        process = procs.spawn(f"sglang-router-{logs_tag}", args)
        _wait(lambda: _get_json(base + "/v1/models")["data"], "sglang-router", process)
    probe = {
        "model": MODEL,
        "messages": [{"role": "system", "content": "ready"}, {"role": "user", "content": "?"}],
        "max_tokens": 1,
    }

    def answers() -> bool:
        request = urllib.request.Request(
            base + "/v1/chat/completions", json.dumps(probe).encode(), {"content-type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status == 200

    _wait(answers, router, process)
    return base


def _gateway_decisions(base: str) -> dict[str, float]:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as response:
        text = response.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("prefixgate_gateway_routing_decisions_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            out[reason] = float(line.rsplit(" ", 1)[1])
    return out


def run_one(
    trace_name: str, trace: Trace, router: str, settings: RunSettings, words: WordVocab, logs: Path
) -> dict[str, Any]:
    procs = Processes(logs)
    tag = f"{trace_name}-{router.split()[0]}"
    try:
        first = _free_ports(settings.replicas)
        sim = [sys.executable, "-m", "bench.sim_replica", "--port", str(first)]
        sim += ["--replicas", str(settings.replicas), "--capacity-blocks", str(settings.capacity_blocks)]
        sim += ["--latency-model", settings.latency_model, "--time-scale", str(settings.time_scale)]
        sim += ["--tokens-per-frame", str(settings.tokens_per_frame), "--model-name", MODEL]
        process = procs.spawn(f"sim-{tag}", sim)
        urls = [f"http://127.0.0.1:{first + i}" for i in range(settings.replicas)]
        _wait(lambda: all(_get_json(u + "/health") for u in urls), "the simulated replicas", process)
        base = _start_router(procs, router, urls, tag)
        before = [_get_json(u + "/sim/stats") for u in urls]
        print(f"{trace_name} / {router}: {len(trace.requests)} requests", file=sys.stderr)
        outcomes, wall_s = asyncio.run(Replay(trace, words, settings.time_scale).run(base))
        after = [_get_json(u + "/sim/stats") for u in urls]
        decisions = _gateway_decisions(base) if router.startswith("prefixgate") else {}
    finally:
        procs.stop_all()
    return summarize(trace_name, router, outcomes, wall_s, settings, before, after, decisions)


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


def summarize(
    trace_name: str,
    router: str,
    outcomes: list[Outcome],
    wall_s: float,
    settings: RunSettings,
    before: list[dict[str, float]],
    after: list[dict[str, float]],
    decisions: dict[str, float],
) -> dict[str, Any]:
    scale = settings.time_scale
    ok = [o for o in outcomes if o.ok]
    ttft = [o.ttft_s * 1e3 / scale for o in ok]
    e2e = [o.latency_s * 1e3 / scale for o in ok]
    end_s = max((o.start_s + o.latency_s for o in ok), default=wall_s) / scale
    prompt = sum(o.prompt_tokens for o in ok)
    cached = sum(o.cached_tokens for o in ok)
    admitted = [
        a["prompt_tokens_admitted"] - b["prompt_tokens_admitted"] for a, b in zip(after, before, strict=True)
    ]
    busy = [
        (a["busy_s"] - b["busy_s"]) / max(a["simulated_s"] - b["simulated_s"], 1e-9)
        for a, b in zip(after, before, strict=True)
    ]
    replica_ttft = [
        t * 1e3
        for a, b in zip(after, before, strict=True)
        for t in a.get("replica_ttfts_s", [])[len(b.get("replica_ttfts_s", [])) :]
    ]
    lag_wall_s = sum(a["lag_s"] - b["lag_s"] for a, b in zip(after, before, strict=True))
    return {
        "trace": trace_name,
        "router": router,
        "requests": len(outcomes),
        "completed": len(ok),
        "errors": sorted({o.error for o in outcomes if not o.ok})[:5],
        "delivered_hit_rate": cached / prompt if prompt else 0.0,
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "ttft_ms": {
            "p50": _pct(ttft, 50),
            "p90": _pct(ttft, 90),
            "p99": _pct(ttft, 99),
            "mean": float(np.mean(ttft)) if ttft else 0.0,
        },
        "e2e_ms": {"p50": _pct(e2e, 50), "p90": _pct(e2e, 90)},
        "duration_s": end_s,
        "requests_per_s": len(ok) / end_s if end_s else 0.0,
        "output_tokens_per_s": sum(o.output_tokens for o in ok) / end_s if end_s else 0.0,
        "wall_s": wall_s,
        "replica_busy_fraction": busy,
        "replica_prompt_tokens": admitted,
        # TTFT at the replicas (arrival there to first token): routing quality without the
        # router's own CPU time, the network and the client.
        "replica_ttft_ms": {"p50": _pct(replica_ttft, 50), "p90": _pct(replica_ttft, 90)},
        "sim_lag_s": lag_wall_s / scale,
        # Share of the replicas' time their steps ran late: how far simulated time stretched.
        "sim_stretch": lag_wall_s / (len(after) * wall_s) if wall_s else 0.0,
        "sim_preemptions": sum(
            a["preemptions"] - b["preemptions"] for a, b in zip(after, before, strict=True)
        ),
        "gateway_decisions": decisions,
    }


# ---- report ------------------------------------------------------------------------------


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in ("sglang-router", "aiohttp", "uvicorn", "msgspec"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return {
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "packages": versions,
    }


def markdown(runs: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    s = meta["settings"]
    lines = [
        f"Routers in front of {s['replicas']} simulated replicas ({s['latency_model']} latency model, "
        f"{s['capacity_blocks']:,} blocks each, time scale {s['time_scale']:g}: simulated GPUs run "
        f"{s['time_scale']:g}x slower than real time; figures in simulated time). Machine: "
        f"{meta['machine']['cores']} cores ({meta['machine']['cpu']}), Python {meta['machine']['python']}, "
        f"sglang-router {meta['machine']['packages'].get('sglang-router', '?')}; {meta['date']}.",
        "",
        "| trace | router | requests ok | delivered hit | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms "
        "| at replicas p50 / p90 | E2E p50 ms | req/s | output tok/s | replica busy min / mean / max "
        "| sim stretch |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|---:|",
    ]
    for r in runs:
        busy = r["replica_busy_fraction"]
        t = r["ttft_ms"]
        lines.append(
            f"| {r['trace']} | {r['router']} | {r['completed']}/{r['requests']} "
            f"| {r['delivered_hit_rate']:.4f} "
            f"| {t['p50']:.0f} | {t['p90']:.0f} | {t['p99']:.0f} "
            f"| {r['replica_ttft_ms']['p50']:.0f} / {r['replica_ttft_ms']['p90']:.0f} "
            f"| {r['e2e_ms']['p50']:.0f} "
            f"| {r['requests_per_s']:.1f} | {r['output_tokens_per_s']:,.0f} "
            f"| {min(busy):.2f} / {np.mean(busy):.2f} / {max(busy):.2f} | {r['sim_stretch']:.1%} |"
        )
    lines.append("")
    for name, spec in meta["traces"].items():
        lines.append(f"- {name}: seed {meta['seed']}, {spec}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", nargs="+", default=list(TRACES), choices=list(TRACES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="TRACE.KEY=VALUE", help="trace option")
    parser.add_argument("--routers", nargs="+", default=list(ROUTERS), choices=list(ROUTERS))
    parser.add_argument("--replicas", type=int, default=8)
    parser.add_argument("--capacity-blocks", type=int, default=24_000)
    parser.add_argument("--time-scale", type=float, default=5.0)
    parser.add_argument("--tokens-per-frame", type=int, default=8)
    parser.add_argument("--latency-model", default="h100-llama3-8b")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    options = {name: dict(TRACES[name]) for name in args.traces}
    for item in args.set:
        key, value = item.split("=", 1)
        name, field = key.split(".", 1)
        options[name][field] = json.loads(value)
    settings = RunSettings(
        args.replicas, args.capacity_blocks, args.time_scale, args.tokens_per_frame, args.latency_model
    )
    from engine.model_store import ensure_default_model

    words = WordVocab(Tokenizer.from_file(str(ensure_default_model() / "tokenizer.json")))
    logs = Path(tempfile.mkdtemp(prefix="compare_routers-"))
    print(f"process logs: {logs}", file=sys.stderr)
    runs = []
    for name in args.traces:
        trace = generate(name, seed=args.seed, **options[name])
        for router in args.routers:
            result = run_one(name, trace, router, settings, words, logs)
            print(
                json.dumps({k: v for k, v in result.items() if k != "replica_prompt_tokens"}), file=sys.stderr
            )
            runs.append(result)
    date = datetime.datetime.now(datetime.UTC)
    meta = {
        "date": date.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": _machine(),
        "seed": args.seed,
        "traces": options,
        "settings": asdict(settings),
        "load_average": os.getloadavg(),
    }
    table = markdown(runs, meta)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"compare-routers-{date.strftime('%Y-%m-%d')}"
    stem.with_suffix(".json").write_text(json.dumps({**meta, "runs": runs}, indent=1) + "\n")
    stem.with_suffix(".md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
