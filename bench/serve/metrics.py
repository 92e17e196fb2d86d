"""The serving metrics, with vLLM's `benchmark_serving` / `vllm bench serve` definitions.

Per request (all in seconds, client side, from the moment the request was sent, i.e. after
any --max-concurrency wait):
- TTFT: arrival of the first chunk that carries output text.
- ITL: the gap between consecutive output-carrying chunks (one entry per chunk, not per token:
  a chunk that bundles several tokens is one gap).
- E2E latency: arrival of the last chunk that carries a choice (the output, or the finish
  reason after it); the usage chunk and [DONE] do not count.
- TPOT: (E2E latency - TTFT) / (output tokens - 1), only for requests with more than one
  output token; for goodput a one-token request has TPOT 0.
- Output tokens: the response's usage.completion_tokens, else the number of output chunks.

One difference from vLLM, on purpose: vLLM counts the first chunk with any choice as the first
token, because vLLM's server sends the assistant-role chunk together with the first token. Our
servers (and OpenAI's) send the role chunk at once, before prefill, so counting it would make
TTFT the time to the HTTP headers; like SGLang's bench_serving, only chunks with output count.

Run level: durations from the start of the run to the last response; throughputs are per second
of that duration over completed requests; mean / median / std / p90 / p99 with numpy's default
(linear) percentiles, 0 for an empty list; goodput counts completed requests that meet every
given SLO (ttft, tpot, e2el in ms; a request meets an SLO when its value <= the SLO).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import msgspec
import numpy as np

SLO_METRICS = ("ttft", "tpot", "e2el")


@dataclass(frozen=True)
class RequestOutcome:
    """What one streamed request gave; times in seconds."""

    request_id: str
    success: bool
    start_s: float  # when it was sent, from the start of the run
    ttft_s: float = 0.0
    latency_s: float = 0.0
    itl_s: tuple[float, ...] = ()
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens
    usage_reported: bool = False
    session_id: str | None = None
    error: str = ""

    @property
    def tpot_s(self) -> float:
        """vLLM's TPOT; 0 when there is at most one output token."""
        if self.output_tokens <= 1:
            return 0.0
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)


class LatencyStats(msgspec.Struct, kw_only=True):
    """One metric over a run, in milliseconds."""

    mean: float
    median: float
    std: float
    p90: float
    p99: float
    count: int


class ServeMetrics(msgspec.Struct, kw_only=True):
    duration_s: float
    completed: int
    failed: int
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    request_goodput: float | None  # None when no SLO was given
    good_requests: int | None
    max_concurrent_requests: int
    ttft_ms: LatencyStats
    tpot_ms: LatencyStats
    itl_ms: LatencyStats
    e2el_ms: LatencyStats


def latency_stats(values_s: Sequence[float]) -> LatencyStats:
    """mean / median / std / p90 / p99 in ms; all 0 for no values (as vLLM's `x or 0`)."""
    data = np.asarray(values_s if len(values_s) else [0.0], dtype=np.float64) * 1000.0
    return LatencyStats(
        mean=float(np.mean(data)),
        median=float(np.median(data)),
        std=float(np.std(data)),
        p90=float(np.percentile(data, 90)),
        p99=float(np.percentile(data, 99)),
        count=len(values_s),
    )


def parse_slo(text: str) -> dict[str, float]:
    """'ttft_ms=500,tpot_ms=50' (or 'ttft:500 tpot:50', as vLLM's --goodput) -> {'ttft': 500.0, ...}."""
    slo: dict[str, float] = {}
    for item in text.replace(",", " ").split():
        key, sep, value = item.replace(":", "=").partition("=")
        name = key.strip().lower().removesuffix("_ms")
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"bad SLO {item!r}: use ttft_ms=..., tpot_ms=..., e2el_ms=...")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"bad SLO {item!r}: {value!r} is not a number") from None
        if ms < 0:
            raise ValueError(f"bad SLO {item!r}: must not be negative")
        slo[name] = ms
    return slo


def meets_slo(outcome: RequestOutcome, slo_ms: Mapping[str, float]) -> bool:
    values = {"ttft": outcome.ttft_s, "tpot": outcome.tpot_s, "e2el": outcome.latency_s}
    return all(values[name] <= limit / 1000.0 for name, limit in slo_ms.items())


def peak_concurrency(outcomes: Sequence[RequestOutcome]) -> int:
    """Most requests in flight at once (half-open [start, end) intervals, ends first on ties)."""
    events = sorted([(o.start_s, 1) for o in outcomes] + [(o.start_s + o.latency_s, -1) for o in outcomes])
    current = peak = 0
    for _, step in events:
        current += step
        peak = max(peak, current)
    return peak


def compute_metrics(
    outcomes: Sequence[RequestOutcome], duration_s: float, slo_ms: Mapping[str, float] | None = None
) -> ServeMetrics:
    if duration_s <= 0:
        raise ValueError(f"duration must be positive, got {duration_s}")
    done = [o for o in outcomes if o.success]
    ttfts = [o.ttft_s for o in done]
    tpots = [o.tpot_s for o in done if o.output_tokens > 1]
    itls = [gap for o in done for gap in o.itl_s]
    e2els = [o.latency_s for o in done]
    total_in = sum(o.prompt_tokens for o in done)
    total_out = sum(o.output_tokens for o in done)
    good = sum(meets_slo(o, slo_ms) for o in done) if slo_ms else None
    return ServeMetrics(
        duration_s=duration_s,
        completed=len(done),
        failed=len(outcomes) - len(done),
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        request_throughput=len(done) / duration_s,
        output_throughput=total_out / duration_s,
        total_token_throughput=(total_in + total_out) / duration_s,
        request_goodput=None if good is None else good / duration_s,
        good_requests=good,
        max_concurrent_requests=peak_concurrency(done),
        ttft_ms=latency_stats(ttfts),
        tpot_ms=latency_stats(tpots),
        itl_ms=latency_stats(itls),
        e2el_ms=latency_stats(e2els),
    )
