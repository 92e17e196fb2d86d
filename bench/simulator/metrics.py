"""Per-request records and a run's summary, with vLLM's benchmark definitions.

TTFT = first token - arrival; E2E = finish - arrival; TPOT = (E2E - TTFT) / (output tokens - 1)
over requests with more than one output token; percentiles with numpy's default (linear)
interpolation, as vLLM's benchmark_serving computes them. Throughput is over the span from
the first arrival to the last finish. Delivered hit rate = cached prompt tokens the replicas
reported at admission / prompt tokens; predicted = what the routing decision expected.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec
import numpy as np

from bench.simulator.replica import SimRequest

if TYPE_CHECKING:
    from bench.simulator.sim import Simulation


class RequestRecord(msgspec.Struct, frozen=True):
    request_id: str
    replica: int
    arrival_s: float
    first_token_s: float
    finish_s: float
    prompt_len: int
    output_len: int
    cached_tokens: int
    predicted_cached_tokens: int
    preemptions: int

    @classmethod
    def of(cls, request: SimRequest) -> RequestRecord:
        assert request.first_token_s is not None and request.finish_s is not None
        return cls(
            request_id=request.request_id,
            replica=request.replica,
            arrival_s=request.arrival_s,
            first_token_s=request.first_token_s,
            finish_s=request.finish_s,
            prompt_len=request.prompt_len,
            output_len=request.output_len,
            cached_tokens=max(request.num_cached_tokens, 0),
            predicted_cached_tokens=request.predicted_cached,
            preemptions=request.num_preemptions,
        )

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def e2e_s(self) -> float:
        return self.finish_s - self.arrival_s


class Percentiles(msgspec.Struct, frozen=True):
    mean: float
    median: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: list[float]) -> Percentiles:
        if not values:
            return cls(0.0, 0.0, 0.0, 0.0)
        arr = np.asarray(values, dtype=np.float64)
        p50, p90, p99 = np.percentile(arr, [50, 90, 99])
        return cls(float(arr.mean()), float(p50), float(p90), float(p99))


class ReplicaSummary(msgspec.Struct, frozen=True):
    replica: int
    requests: int
    prompt_tokens: int
    cached_tokens: int
    busy_fraction: float
    steps: int
    preemptions: int


class RunSummary(msgspec.Struct, frozen=True):
    policy: str
    num_replicas: int
    card: str
    num_blocks: int
    num_requests: int
    duration_s: float
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft_ms: Percentiles
    tpot_ms: Percentiles
    e2e_ms: Percentiles
    delivered_hit_rate: float
    predicted_hit_rate: float
    load_imbalance: float  # max / mean of requests per replica
    busy_imbalance: float  # max / mean of busy time per replica
    preemptions: int
    replicas: list[ReplicaSummary]
    wall_s: float


def summarize(sim: Simulation, wall_s: float) -> RunSummary:
    records = sim.records
    config = sim.config
    start = min(r.arrival_s for r in records)
    end = max(r.finish_s for r in records)
    span = max(end - start, 1e-9)
    prompt = sum(r.prompt_len for r in records)
    output = sum(r.output_len for r in records)
    cached = sum(r.cached_tokens for r in records)
    predicted = sum(r.predicted_cached_tokens for r in records)
    per_replica = []
    for replica in sim.replicas:
        mine = [r for r in records if r.replica == replica.index]
        per_replica.append(
            ReplicaSummary(
                replica=replica.index,
                requests=len(mine),
                prompt_tokens=sum(r.prompt_len for r in mine),
                cached_tokens=sum(r.cached_tokens for r in mine),
                busy_fraction=replica.busy_s / span,
                steps=replica.num_steps,
                preemptions=replica.num_preemptions,
            )
        )
    counts = [s.requests for s in per_replica]
    busy = [s.busy_fraction for s in per_replica]
    return RunSummary(
        policy=config.policy,
        num_replicas=config.num_replicas,
        card=config.latency.card,
        num_blocks=config.replica.num_blocks,
        num_requests=len(records),
        duration_s=span,
        request_throughput=len(records) / span,
        output_throughput=output / span,
        total_token_throughput=(prompt + output) / span,
        ttft_ms=Percentiles.of([r.ttft_s * 1000 for r in records]),
        tpot_ms=Percentiles.of(
            [(r.e2e_s - r.ttft_s) * 1000 / (r.output_len - 1) for r in records if r.output_len > 1]
        ),
        e2e_ms=Percentiles.of([r.e2e_s * 1000 for r in records]),
        delivered_hit_rate=cached / prompt if prompt else 0.0,
        predicted_hit_rate=predicted / prompt if prompt else 0.0,
        load_imbalance=max(counts) / (sum(counts) / len(counts)) if sum(counts) else 0.0,
        busy_imbalance=max(busy) / (sum(busy) / len(busy)) if sum(busy) else 0.0,
        preemptions=sum(s.preemptions for s in per_replica),
        replicas=per_replica,
        wall_s=wall_s,
    )
