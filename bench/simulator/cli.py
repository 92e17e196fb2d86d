"""`prefixgate bench workload` (write a trace) and `prefixgate bench simulate` (replay it)."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields
from typing import Any

from bench.simulator.config import POLICIES, ReplicaConfig
from bench.simulator.latency import CARDS
from bench.workloads import WORKLOADS, generate
from bench.workloads.trace import Trace


def add_bench_commands(commands: Any) -> Any:
    """Add `bench` with `workload` and `simulate`; returns its subcommands (for more to join)."""
    bench = commands.add_parser("bench", help="workload traces and the routing simulator")
    sub = bench.add_subparsers(dest="bench_command", required=True)

    workload = sub.add_parser("workload", help="generate a replayable JSONL trace")
    workload.add_argument("--workload", choices=sorted(WORKLOADS), required=True)
    _generator_options(workload)
    workload.add_argument("--out", required=True, help="the JSONL file to write")

    simulate = sub.add_parser("simulate", help="replay a trace against simulated replicas, per policy")
    source = simulate.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", help="a JSONL trace from `prefixgate bench workload`")
    source.add_argument("--workload", choices=sorted(WORKLOADS), help="generate the trace in place")
    _generator_options(simulate)
    simulate.add_argument("--replicas", default="2,4,8,16,32,64", help="comma-separated replica counts")
    simulate.add_argument("--policies", default=",".join(POLICIES))
    simulate.add_argument("--card", choices=sorted(CARDS), default="h100", help="latency model")
    simulate.add_argument(
        "--num-blocks", type=int, default=ReplicaConfig.num_blocks, help="KV blocks per replica"
    )
    simulate.add_argument("--max-num-seqs", type=int, default=ReplicaConfig.max_num_seqs)
    simulate.add_argument("--max-batched-tokens", type=int, default=ReplicaConfig.max_batched_tokens)
    simulate.add_argument("--out", default="bench/results", help="folder for the JSON and markdown")
    simulate.add_argument("--name", default=None, help="file name stem (default: simulate-<workload>)")
    return sub


def _generator_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="workload seed")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a workload config field (repeatable)"
    )


def _options(workload: str, pairs: list[str]) -> dict[str, Any]:
    config_class, _ = WORKLOADS[workload]
    types = {f.name: f.type for f in fields(config_class)}
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in types:
            raise ValueError(f"bad --set {pair!r}: options of {workload} are {sorted(types)}")
        kind = types[key]
        options[key] = (
            value.lower() in ("1", "true", "yes")
            if kind in (bool, "bool")
            else (int(value) if kind in (int, "int") else float(value))
        )
    return options


def _load(args: argparse.Namespace) -> Trace:
    if getattr(args, "trace", None):
        return Trace.read(args.trace)
    return generate(args.workload, seed=args.seed, **_options(args.workload, args.set))


def run_bench(args: argparse.Namespace) -> int:
    # The simulator imports the engine's cache manager (and with it torch): only when asked.
    from bench.simulator.report import Sweep, run_sweep, shareable_fraction, write
    from bench.simulator.sim import PreparedTrace

    try:
        trace = _load(args)
        if args.bench_command == "workload":
            trace.write(args.out)
            print(f"prefixgate: wrote {len(trace.requests)} requests to {args.out}", file=sys.stderr)
            return 0
        replica = ReplicaConfig(
            num_blocks=args.num_blocks,
            max_num_seqs=args.max_num_seqs,
            max_batched_tokens=args.max_batched_tokens,
        )
        policies = tuple(p.strip() for p in args.policies.split(",") if p.strip())
        unknown = sorted(set(policies) - set(POLICIES))
        if unknown:
            raise ValueError(f"unknown policies {unknown} (known: {list(POLICIES)})")
        counts = tuple(int(n) for n in args.replicas.split(","))
        if min(counts) < 1:
            raise ValueError("replica counts must be >= 1")
        sweep = Sweep(counts, policies, replica, CARDS[args.card])
        started = time.perf_counter()
        prepared = PreparedTrace(trace, replica.block_size, replica.model_id)
        shareable = shareable_fraction(prepared)
        print(
            f"prefixgate: {len(trace.requests)} requests, shareable prefix {shareable:.3f}", file=sys.stderr
        )
        results = run_sweep(prepared, sweep, progress=print)
        name = args.name or f"simulate-{trace.header.workload}"
        json_path, md_path = write(args.out, name, trace, sweep, results, shareable)
        print(
            f"prefixgate: wrote {json_path} and {md_path} in {time.perf_counter() - started:.1f} s",
            file=sys.stderr,
        )
    except (OSError, ValueError) as err:
        print(f"prefixgate: error: {err}", file=sys.stderr)
        return 2
    return 0
