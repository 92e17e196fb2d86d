"""Derive the latency model from bench/offline.py results, and check it by replaying the same
scenarios through one simulated replica.

    python -m bench.simulator.calibration bench/results/offline-llama3-8b-NVIDIA_H100_80GB_HBM3.json
    python -m bench.simulator.calibration OFFLINE.json --served CLUSTER.json

With --served (a `bench.gpu_cluster --step-logs` report from the same card), the cost of a
decode's KV read comes from the served run's pure-decode graph steps rather than from the copy
bandwidth: served batches (1-128 rows over 3k-9k-token contexts) read KV at ~75% of the copy
bandwidth, and rows sharing a prefix each pay for it (no L2 reuse shows), which the offline
scenarios cannot tell.

Prints the fitted constants (paste them into latency.py; eager_launch_ms is not fitted here but
measured by bench/profile_mixed.py, so keep the card's) and a table of measured vs simulated
figures for the four offline scenarios. LatencyModel's docstring gives the derivation.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import replace
from pathlib import Path

from bench.simulator.config import ReplicaConfig
from bench.simulator.latency import LLAMA3_8B_KV_BYTES_PER_TOKEN, LatencyModel
from bench.simulator.sim import PreparedTrace, Simulation, SimulationConfig
from bench.workloads.trace import LLAMA3_VOCAB, KeyMaker, Segment, Trace, TraceHeader, TraceRequest

# bench/offline.py's engine settings; the KV pool there was 0.45 of free memory (~13,700 blocks
# on an 80 GB card), larger than any of these scenarios needs.
OFFLINE_REPLICA = ReplicaConfig(num_blocks=13_700, max_num_seqs=256, max_batched_tokens=8192)
DECODE_CONTEXT = 512 + 64  # decode_b1: a 512-token prompt, 128 new tokens, mean context


def measured(path: str | Path) -> dict[str, float]:
    data = json.loads(Path(path).read_text())
    by = {r["scenario"]: r for r in data["results"]}
    ttft = by["cached_prefix_ttft"]
    return {
        "bandwidth_b_s": data["copy_bandwidth_tb_s"] * 1e12,
        "decode_b1_ms": by["decode_b1"]["ours"],
        "shared_prefix_tok_s": by["shared_prefix"]["ours"],
        "sharegpt_req_s": by["sharegpt_like"]["ours"],
        "cached_ttft_ms": ttft["ours"],
        "bare_ttft_ms": ttft["extra"]["bare_128_ms"],
        "cold_ttft_ms": ttft["peer"],
    }


def derive(path: str | Path, seq_ms: float, card: str, kv_ms: float | None = None) -> LatencyModel:
    m = measured(path)
    kv = LLAMA3_8B_KV_BYTES_PER_TOKEN / m["bandwidth_b_s"] * 1000 if kv_ms is None else kv_ms
    decode, bare, cached, cold = m["decode_b1_ms"], m["bare_ttft_ms"], m["cached_ttft_ms"], m["cold_ttft_ms"]
    # bare - decode  = 127 token + self * 128^2/2 - kv * context
    # cold - cached - decode = 8191 token + self * (8192^2 - 128^2)/2 ... the first cold step's
    # chunk is 8,192 tokens against decode's 1 (the 128^2/2 of decode is 0).
    e1 = bare - decode + kv * DECODE_CONTEXT
    e2 = cold - cached - decode + kv * DECODE_CONTEXT
    a11, a12, a21, a22 = 127.0, 128 * 128 / 2, 8191.0, 8192 * 8192 / 2
    det = a11 * a22 - a12 * a21
    token = (e1 * a22 - a12 * e2) / det
    self_pair = (a11 * e2 - a21 * e1) / det
    return LatencyModel(
        card=card,
        source=str(path),
        step_base_ms=decode - token - seq_ms - kv * DECODE_CONTEXT,
        token_ms=token,
        context_pair_ms=(cached - bare) / (128 * 8192),
        self_pair_ms=self_pair,
        kv_read_ms_per_token=kv,
        seq_ms=seq_ms,
        dedup_shared_kv=kv_ms is None,
    )


def served_kv_ms(report_path: str | Path, model: LatencyModel) -> float:
    """ms per KV token a decode row reads, from a served run's pure-decode graph steps: their
    time less the model's base and per-row costs, over the keys every row reads (least squares
    through the origin). Shared blocks count once per row that reads them."""
    from bench.step_fit import runs_of  # the step-log reader, kept out of the simulator's imports

    report_path = Path(report_path)
    steps = [
        r
        for records in runs_of(json.loads(report_path.read_text()), report_path.parent).values()
        for r in records
        if r.kind == "graph" and not r.chunks and r.decodes
    ]
    if not steps:
        raise ValueError(f"{report_path}: no pure-decode graph steps in its step logs")
    per_row = model.token_ms + model.seq_ms
    residual = [(r.step_s * 1e3 - model.step_base_ms - per_row * r.decodes, r.decode_kv) for r in steps]
    return sum(res * kv for res, kv in residual) / sum(kv * kv for _, kv in residual)


def _trace(requests: list[TraceRequest]) -> PreparedTrace:
    header = TraceHeader(workload="offline", seed=0, vocab_size=LLAMA3_VOCAB, num_requests=len(requests))
    return PreparedTrace(Trace(header, tuple(requests)), OFFLINE_REPLICA.block_size)


def _request(
    keys: KeyMaker, name: str, prompt: list[Segment], output: int, after: str | None = None
) -> TraceRequest:
    return TraceRequest(
        request_id=name,
        prompt=prompt,
        output_len=output,
        output_key=keys(),
        arrival_s=None if after else 0.0,
        after=[after] if after else [],
    )


def _run(prepared: PreparedTrace, model: LatencyModel) -> Simulation:
    sim = Simulation(
        prepared,
        SimulationConfig(num_replicas=1, policy="round_robin", replica=OFFLINE_REPLICA, latency=model),
    )
    sim.run()
    return sim


def sharegpt_like() -> PreparedTrace:
    """bench/offline.py's 500 requests: the same lengths (same generator, same draws)."""
    rng = random.Random(3)
    inputs = [max(4, min(2048, int(rng.lognormvariate(4.9, 0.8)))) for _ in range(500)]
    outputs = [max(4, min(1024, int(rng.lognormvariate(4.8, 0.8)))) for _ in range(500)]
    keys = KeyMaker(3, stream=7)
    return _trace(
        [
            _request(keys, f"s{i}", [Segment(keys(), n)], o)
            for i, (n, o) in enumerate(zip(inputs, outputs, strict=True))
        ]
    )


def shared_prefix() -> PreparedTrace:
    keys = KeyMaker(2, stream=7)
    requests = []
    for g in range(8):
        prefix = Segment(keys(), 2048)
        requests += [_request(keys, f"g{g}-{i}", [prefix, Segment(keys(), 128)], 128) for i in range(32)]
    return _trace(requests)


def single_requests() -> PreparedTrace:
    """decode_b1, then cached_prefix_ttft's sequence: prefix + 16, prefix + 128, bare 128, cold 8,320."""
    keys = KeyMaker(4, stream=7)
    prefix = Segment(keys(), 8192)
    return _trace(
        [
            _request(keys, "decode", [Segment(keys(), 512)], 128),
            _request(keys, "warm", [prefix, Segment(keys(), 16)], 1, after="decode"),
            _request(keys, "cached", [prefix, Segment(keys(), 128)], 1, after="warm"),
            _request(keys, "bare", [Segment(keys(), 128)], 1, after="cached"),
            _request(keys, "cold", [Segment(keys(), 8320)], 1, after="bare"),
        ]
    )


def simulated(model: LatencyModel) -> dict[str, float]:
    singles = {r.request_id: r for r in _run(single_requests(), model).records}
    decode = singles["decode"]
    sharegpt = _run(sharegpt_like(), model).records
    shared = _run(shared_prefix(), model).records
    return {
        "decode_b1_ms": (decode.e2e_s - decode.ttft_s) * 1000 / (decode.output_len - 1),
        "shared_prefix_tok_s": sum(r.output_len for r in shared) / max(r.finish_s for r in shared),
        "sharegpt_req_s": len(sharegpt) / max(r.finish_s for r in sharegpt),
        "cached_ttft_ms": singles["cached"].ttft_s * 1000,
        "bare_ttft_ms": singles["bare"].ttft_s * 1000,
        "cold_ttft_ms": singles["cold"].ttft_s * 1000,
    }


def fit(path: str | Path, card: str, kv_ms: float | None = None) -> LatencyModel:
    """Bisect seq_ms (the one constant no single-request scenario pins) on ShareGPT-like req/s."""
    target = measured(path)["sharegpt_req_s"]
    low, high = 0.0, 0.5
    for _ in range(16):
        mid = (low + high) / 2
        rate = simulated_sharegpt(derive(path, mid, card, kv_ms))
        low, high = (mid, high) if rate > target else (low, mid)
    return derive(path, (low + high) / 2, card, kv_ms)


def fit_served(path: str | Path, card: str, served: str | Path, rounds: int = 4) -> LatencyModel:
    """The KV cost from served steps and the rest from the offline figures depend on each other
    (the served fit holds base and per-row costs fixed): alternate until they settle."""
    model = fit(path, card)
    for _ in range(rounds):
        model = fit(path, card, served_kv_ms(served, model))
    return model


def simulated_sharegpt(model: LatencyModel) -> float:
    records = _run(sharegpt_like(), model).records
    return len(records) / max(r.finish_s for r in records)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("result", help="a bench/offline.py JSON result file")
    parser.add_argument("--served", default=None, help="a bench.gpu_cluster --step-logs report (same card)")
    args = parser.parse_args(argv)
    card = json.loads(Path(args.result).read_text())["card"]
    if args.served:
        model = replace(fit_served(args.result, card, args.served), source=f"{args.result} + {args.served}")
    else:
        model = replace(fit(args.result, card), source=args.result)
    print(model)
    want = measured(args.result)
    got = simulated(model)
    other_mode = simulated(replace(model, dedup_shared_kv=not model.dedup_shared_kv))
    mode = "shared KV read per request" if model.dedup_shared_kv else "shared KV read once"
    print(f"| scenario | measured | simulated | error | {mode} |")
    print("|---|---:|---:|---:|---:|")
    for key, value in got.items():
        other = other_mode[key]
        print(
            f"| {key} | {want[key]:,.2f} | {value:,.2f} | {value / want[key] - 1:+.1%} "
            f"| {other:,.2f} ({other / want[key] - 1:+.1%}) |"
        )


if __name__ == "__main__":
    main()
