"""Soak: a real gateway in front of real replicas of the embedded model, a long mixed run,
then integrity, accounting and memory checks.

    python -m bench.soak --requests 10000

Starts 2 replicas (small KV pool, so blocks are evicted all run long) and a gateway on
127.0.0.1, drives the request mix of bench/soak_requests.py with bounded concurrency
(streams and not, chat and completions, n > 1, stop strings, aborts mid-stream, disconnects
before the first token, 400s, 404s, some requests straight to a replica), samples the RSS of
the gateway, each replica and each replica's engine core, and at the end, with nothing in
flight, checks: every replica's core passes its integrity check (block ref counts equal the
radix tree's + requests' holders, free list consistent) and is idle with no block held; a
copy of its cache built from /kv/events equals the cache; the gateway's in-flight gauges are
0; no answer was a 5xx or malformed; every process is alive and answers a normal request;
RSS grew by at most --max-rss-growth from the end of warm-up (the first 10% of requests) to
the end. Prints a table and writes JSON (default bench/results/soak-<UTC date>.json); exits 1
if a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from bench.soak_cluster import KVMirror, Server, engine_core_pid, get_json, metric_series, pid_alive, rss_kib
from bench.soak_requests import KINDS, Context, Outcome, Targets, plan_kinds, run_one, shared_prompts

RESULTS = Path(__file__).resolve().parent / "results"
_REPLICA_METRICS = (
    "prefixgate_engine_step_seconds_sum",
    "prefixgate_engine_step_seconds_count",
    "prefixgate_preemptions_total",
    "prefixgate_prefix_cache_queries_tokens_total",
    "prefixgate_prefix_cache_hits_tokens_total",
    "prefixgate_request_finished_total",
    "prefixgate_requests_rejected_total",
)
_GATEWAY_METRICS = ("prefixgate_gateway_requests_total", "prefixgate_gateway_retries_total")


@dataclass(frozen=True, slots=True)
class SoakConfig:
    requests: int = 10_000
    concurrency: int = 12
    replicas: int = 2
    num_blocks: int = 256  # per replica, 16 tokens each: small, so the cache evicts
    max_num_seqs: int = 32
    policy: str = "kv_aware"
    seed: int = 0
    warmup_fraction: float = 0.1
    max_rss_growth: float | None = 0.05  # None: report RSS, check nothing
    sample_interval_s: float = 1.0
    request_timeout_s: float = 300.0
    drain_timeout_s: float = 120.0
    start_timeout_s: float = 300.0
    log_dir: str | None = None
    out: str | None = None  # JSON report path; "" writes none


@dataclass
class RssTrack:
    """RSS samples of the watched processes: (requests completed, {process: KiB})."""

    pids: dict[str, int]
    samples: list[tuple[int, dict[str, int | None]]]

    def sample(self, completed: int) -> None:
        self.samples.append((completed, {name: rss_kib(pid) for name, pid in self.pids.items()}))

    def peak(self, name: str, low: int, high: int) -> int | None:
        values = [s[name] for done, s in self.samples if low <= done <= high and s[name] is not None]
        return max(values) if values else None  # type: ignore[type-var]


class Soak:
    def __init__(self, config: SoakConfig) -> None:
        self.config = config
        self.log_dir = Path(config.log_dir or tempfile.mkdtemp(prefix="soak-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        engine_args = [
            "engine",
            "--device",
            "cpu",
            "--log-level",
            "warning",
            "--num-blocks",
            str(config.num_blocks),
            "--max-num-seqs",
            str(config.max_num_seqs),
        ]
        # One torch thread per replica, so the replicas share the cores evenly.
        self.replicas = [
            Server(f"replica{i}", engine_args, self.log_dir / f"replica{i}.log", {"OMP_NUM_THREADS": "1"})
            for i in range(config.replicas)
        ]
        self.gateway: Server | None = None
        self.outcomes: list[Outcome] = []
        self.checks: list[dict[str, Any]] = []
        self.mirrors = [KVMirror(r.url) for r in self.replicas]
        self.rss: dict[str, dict[str, float | None]] = {}
        self.metrics: dict[str, dict[str, float]] = {}

    def check(self, name: str, passed: bool, detail: Any = None) -> None:
        self.checks.append({"check": name, "passed": bool(passed), "detail": detail})

    async def run(self) -> dict[str, Any]:
        started_at = datetime.now(UTC)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
        connector = aiohttp.TCPConnector(limit=self.config.concurrency * 2 + 8)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            try:
                return await self._run(session, started_at)
            finally:
                for server in [*self.replicas, *([self.gateway] if self.gateway else [])]:
                    server.stop()

    async def _run(self, session: aiohttp.ClientSession, started_at: datetime) -> dict[str, Any]:
        config = self.config
        t0 = time.monotonic()
        for replica in self.replicas:
            replica.start()
        await asyncio.gather(*(r.wait_ready(session, config.start_timeout_s) for r in self.replicas))
        gateway_args = ["gateway", "--policy", config.policy, "--log-level", "warning"]
        for replica in self.replicas:
            gateway_args += ["--replica", replica.url]
        self.gateway = Server("gateway", gateway_args, self.log_dir / "gateway.log").start()
        await self.gateway.wait_ready(session, config.start_timeout_s)
        startup_s = time.monotonic() - t0
        _, models = await get_json(session, self.gateway.url + "/v1/models")
        model = models["data"][0]["id"]
        targets = Targets(self.gateway.url, tuple(r.url for r in self.replicas), model)
        pids = {"gateway": self.gateway.pid}
        for replica in self.replicas:
            pids[replica.name] = replica.pid
            core = engine_core_pid(replica.pid)
            if core is not None:
                pids[f"{replica.name}-core"] = core
        self.check("engine core found for every replica", len(pids) == 1 + 2 * len(self.replicas), pids)
        rss = RssTrack(pids, [])
        followers = [asyncio.create_task(m.follow(session)) for m in self.mirrors]

        t_load = time.monotonic()
        await self._drive(session, targets, rss)
        load_s = time.monotonic() - t_load
        drained = await self._drain(session)
        rss.sample(config.requests)
        drain_s = time.monotonic() - t_load - load_s
        await self._final_checks(session, targets, drained)
        self._rss_check(rss)
        for task in followers:
            task.cancel()
        return self._report(started_at, startup_s, load_s, drain_s, rss)

    async def _drive(self, session: aiohttp.ClientSession, targets: Targets, rss: RssTrack) -> None:
        config = self.config
        kinds = plan_kinds(config.seed, config.requests)
        prompts = shared_prompts(config.seed)
        next_index = 0
        marks = sorted({int(config.requests * f) for f in (0.05, config.warmup_fraction, 0.95)})
        started = time.monotonic()

        async def sampler() -> None:
            while True:
                rss.sample(len(self.outcomes))
                await asyncio.sleep(config.sample_interval_s)

        async def worker() -> None:
            nonlocal next_index
            while next_index < config.requests:
                index = next_index
                next_index += 1
                rng = random.Random(config.seed * 1_000_003 + index)
                ctx = Context(session, targets, prompts, rng, index)
                self.outcomes.append(await run_one(ctx, kinds[index], config.request_timeout_s))
                done = len(self.outcomes)
                if done in marks:
                    rss.sample(done)
                if done % max(1, config.requests // 20) == 0:
                    rate = done / (time.monotonic() - started)
                    print(f"  {done}/{config.requests} requests, {rate:.1f}/s", file=sys.stderr, flush=True)

        sampling = asyncio.create_task(sampler())
        await asyncio.gather(*(worker() for _ in range(config.concurrency)))
        sampling.cancel()
        rss.sample(len(self.outcomes))

    async def _drain(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        """Wait until the gateway tracks no request and every replica is idle; their states."""
        assert self.gateway is not None
        deadline = time.monotonic() + self.config.drain_timeout_s
        while True:
            in_flight = await metric_series(
                session, self.gateway.url, "prefixgate_gateway_in_flight_requests"
            )
            states = {r.name: (await get_json(session, r.url + "/debug/cache"))[1] for r in self.replicas}
            idle = all(not s["running"] and not s["waiting"] and s["in_flight"] == 0 for s in states.values())
            if (idle and not any(in_flight.values())) or time.monotonic() > deadline:
                return {"gateway_in_flight": in_flight, "replicas": states}
            await asyncio.sleep(0.2)

    async def _final_checks(
        self, session: aiohttp.ClientSession, targets: Targets, drained: dict[str, Any]
    ) -> None:
        assert self.gateway is not None
        in_flight = drained["gateway_in_flight"]
        self.check(
            "gateway in-flight gauge is 0 for every replica",
            len(in_flight) == len(self.replicas) and not any(in_flight.values()),
            in_flight,
        )
        healthy = await metric_series(session, self.gateway.url, "prefixgate_gateway_replica_healthy")
        self.check(
            "gateway sees every replica healthy",
            sorted(healthy.values()) == [1.0] * len(self.replicas),
            healthy,
        )
        for replica, mirror in zip(self.replicas, self.mirrors, strict=True):
            state = drained["replicas"][replica.name]
            load = state["load"]
            self.check(
                f"{replica.name}: integrity check passes",
                state["integrity_error"] is None,
                state["integrity_error"],
            )
            self.check(
                f"{replica.name}: idle (nothing running, waiting or tracked)",
                not state["running"] and not state["waiting"] and state["in_flight"] == 0,
                {k: state[k] for k in ("running", "waiting", "in_flight")},
            )
            self.check(
                f"{replica.name}: no block held by a request; every block free or cached",
                load["used_blocks"] == 0
                and load["free_blocks"] + load["cached_blocks"] == load["num_blocks"],
                {k: load[k] for k in ("num_blocks", "free_blocks", "cached_blocks", "used_blocks")},
            )
            caught_up = await mirror.wait_for(state["last_seq"], 10.0)
            cached = set(state["cached_block_hashes"])
            self.check(
                f"{replica.name}: /kv/events copy equals the cache",
                caught_up and mirror.last_seq == state["last_seq"] and mirror.hashes == cached,
                {
                    "events_seq": mirror.last_seq,
                    "replica_seq": state["last_seq"],
                    "copy": len(mirror.hashes),
                    "cache": len(cached),
                },
            )
            self.check(f"{replica.name}: /kv/events stream never broke", not mirror.breaks, mirror.breaks[:5])
            self.check(
                f"{replica.name}: blocks were evicted",
                mirror.removed > 0,
                {"stored": mirror.stored, "removed": mirror.removed},
            )
        for replica in self.replicas:
            self.metrics[replica.name] = await metric_series(session, replica.url, *_REPLICA_METRICS)
        self.metrics["gateway"] = await metric_series(session, self.gateway.url, *_GATEWAY_METRICS)
        counts = Counter(o.status for o in self.outcomes)
        server_errors = {s: c for s, c in counts.items() if s.startswith("5")}
        self.check("no 5xx", not server_errors, server_errors)
        unexpected = Counter(
            f"{o.kind}:{o.status}" for o in self.outcomes if o.status not in KINDS[o.kind][1]
        )
        self.check("every request ended as its kind should", not unexpected, dict(unexpected))
        problems = [f"{o.kind}: {o.problem}" for o in self.outcomes if o.problem]
        self.check("every answer well formed", not problems, problems[:10])
        self.check(
            "every request accounted for", len(self.outcomes) == self.config.requests, len(self.outcomes)
        )
        await self._still_serving(session, targets)

    async def _still_serving(self, session: aiohttp.ClientSession, targets: Targets) -> None:
        body = {
            "model": targets.model,
            "max_tokens": 4,
            "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
        }
        for name, url in [("gateway", targets.gateway), *((r.name, r.url) for r in self.replicas)]:
            async with session.post(url + "/v1/chat/completions", json=body) as response:
                answer = await response.json()
            ok = response.status == 200 and bool(answer["choices"][0]["message"]["content"])
            self.check(f"{name}: answers a normal request", ok, {"status": response.status})
        assert self.gateway is not None
        alive = {s.name: s.alive() for s in [self.gateway, *self.replicas]}
        alive.update(
            {
                f"{r.name}-core": (c := engine_core_pid(r.pid)) is not None and pid_alive(c)
                for r in self.replicas
            }
        )
        self.check("every process alive", all(alive.values()), alive)

    def _rss_check(self, rss: RssTrack) -> None:
        n = self.config.requests
        warm_end = int(n * self.config.warmup_fraction)
        table = {}
        for name in rss.pids:
            warm = rss.peak(name, warm_end // 2, warm_end)
            end = rss.peak(name, int(n * 0.95), n)
            last = rss.samples[-1][1][name]
            growth = None if not warm or end is None else (end - warm) / warm
            table[name] = {
                "warmup_mib": _mib(warm),
                "end_mib": _mib(end),
                "after_drain_mib": _mib(last),
                "peak_mib": _mib(rss.peak(name, 0, n)),
                "growth_pct": _pct(growth),
            }
        self.rss = table
        if self.config.max_rss_growth is not None:
            limit = self.config.max_rss_growth
            over = {
                k: v["growth_pct"]
                for k, v in table.items()
                if v["growth_pct"] is None or v["growth_pct"] > 100 * limit
            }
            self.check(f"RSS growth after warm-up <= {100 * limit:g}% for every process", not over, over)

    def _report(
        self, started_at: datetime, startup_s: float, load_s: float, drain_s: float, rss: RssTrack
    ) -> dict[str, Any]:
        by_kind: dict[str, Counter[str]] = defaultdict(Counter)
        prompt_tokens: Counter[str] = Counter()
        cached_tokens: Counter[str] = Counter()
        for o in self.outcomes:
            by_kind[o.kind][o.status] += 1
            prompt_tokens[o.kind] += o.prompt_tokens
            cached_tokens[o.kind] += o.cached_tokens
        kinds = {
            k: {
                "count": sum(by_kind[k].values()),
                "statuses": dict(sorted(by_kind[k].items())),
                "cached_share": round(cached_tokens[k] / prompt_tokens[k], 3) if prompt_tokens[k] else None,
            }
            for k in KINDS
        }
        return {
            "passed": all(c["passed"] for c in self.checks),
            "date": started_at.isoformat(timespec="seconds"),
            "machine": _machine(),
            "config": asdict(self.config),
            "startup_s": round(startup_s, 1),
            "load_s": round(load_s, 1),
            "drain_s": round(drain_s, 1),
            "requests_per_s": round(len(self.outcomes) / load_s, 2) if load_s else None,
            "kinds": kinds,
            "statuses": dict(sorted(Counter(o.status for o in self.outcomes).items())),
            "kv_events": {
                m.url: {
                    "stored": m.stored,
                    "removed": m.removed,
                    "snapshots": m.snapshots,
                    "breaks": m.breaks[:20],
                }
                for m in self.mirrors
            },
            "rss": self.rss,
            "metrics": self.metrics,
            "rss_samples": [
                {"completed": done, **s} for done, s in rss.samples[:: max(1, len(rss.samples) // 200)]
            ],
            "checks": self.checks,
            "log_dir": str(self.log_dir),
        }


def _mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


def _pct(share: float | None) -> float | None:
    return None if share is None else round(100 * share, 2)


def _machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_avg_at_end": os.getloadavg(),
    }


def print_summary(report: dict[str, Any]) -> None:
    print(
        f"\nsoak {report['date']}: {report['config']['requests']} requests in {report['load_s']} s "
        f"({report['requests_per_s']}/s), drain {report['drain_s']} s, startup {report['startup_s']} s"
    )
    print(f"{'kind':<26}{'count':>7}  statuses")
    for kind, row in report["kinds"].items():
        cached = "" if row["cached_share"] is None else f"  cached {row['cached_share']:.0%}"
        print(f"{kind:<26}{row['count']:>7}  {row['statuses']}{cached}")
    print(
        f"\n{'process':<16}{'warm-up MiB':>12}{'end MiB':>10}{'drained MiB':>13}{'peak MiB':>10}{'growth':>9}"
    )
    for name, row in report["rss"].items():
        growth = "-" if row["growth_pct"] is None else f"{row['growth_pct']:+.2f}%"
        print(
            f"{name:<16}{row['warmup_mib']!s:>12}{row['end_mib']!s:>10}{row['after_drain_mib']!s:>13}"
            f"{row['peak_mib']!s:>10}{growth:>9}"
        )
    print(f"\nkv events: {report['kv_events']}")
    for check in report["checks"]:
        detail = "" if check["passed"] else f"  {json.dumps(check['detail'])[:300]}"
        print(f"[{'PASS' if check['passed'] else 'FAIL'}] {check['check']}{detail}")
    print(f"\n{'PASSED' if report['passed'] else 'FAILED'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    defaults = SoakConfig()
    parser.add_argument("--requests", type=int, default=defaults.requests)
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency)
    parser.add_argument("--replicas", type=int, default=defaults.replicas)
    parser.add_argument("--num-blocks", type=int, default=defaults.num_blocks, help="KV blocks per replica")
    parser.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs)
    parser.add_argument("--policy", default=defaults.policy)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--max-rss-growth",
        type=float,
        default=defaults.max_rss_growth,
        help="fail above this RSS growth (0.05 = 5%%); negative: do not check",
    )
    parser.add_argument("--log-dir", default=None, help="process logs (default: a temporary folder)")
    parser.add_argument("--out", default=None, help="JSON report (default bench/results/soak-<date>.json)")
    args = parser.parse_args(argv)
    growth = None if args.max_rss_growth is None or args.max_rss_growth < 0 else args.max_rss_growth
    config = SoakConfig(
        requests=args.requests,
        concurrency=args.concurrency,
        replicas=args.replicas,
        num_blocks=args.num_blocks,
        max_num_seqs=args.max_num_seqs,
        policy=args.policy,
        seed=args.seed,
        max_rss_growth=growth,
        log_dir=args.log_dir,
        out=args.out,
    )
    report = asyncio.run(Soak(config).run())
    print_summary(report)
    out = config.out if config.out is not None else str(RESULTS / f"soak-{report['date'][:10]}.json")
    if out:
        Path(out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
