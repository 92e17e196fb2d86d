"""Prometheus metrics of one replica, kept in the API process.

Latencies are measured here, where the client's request arrives and its tokens leave, from
the core's per-step deltas; engine counters (prefix-cache hits, preemptions, KV usage) come
from the load snapshot each core message carries. Names follow vLLM's where one exists.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from engine.server.protocol import LoadSnapshot

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
_LONG_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class ServerMetrics:
    def __init__(self) -> None:
        disable_created_metrics()  # the *_created series only double the page
        self.registry = CollectorRegistry()
        counter, gauge, histogram = self._counter, self._gauge, self._histogram
        self.http_requests = counter(
            "http_requests", "HTTP requests answered, by route and status", "route", "status"
        )
        self.finished = counter("request_finished", "Engine requests finished, by reason", "finish_reason")
        self.rejected = counter(
            "requests_rejected", "Requests refused before the engine, by reason", "reason"
        )
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests")
        self.generation_tokens = counter("generation_tokens", "Tokens generated")
        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first token", _LONG_BUCKETS)
        self.tpot = histogram(
            "time_per_output_token_seconds",
            "Per request: (last token - first token) / (output tokens - 1)",
            _LATENCY_BUCKETS,
        )
        self.itl = histogram(
            "inter_token_latency_seconds", "Gap between consecutive tokens", _LATENCY_BUCKETS
        )
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to last token", _LONG_BUCKETS)
        self.queue_time = histogram(
            "request_queue_time_seconds", "Arrival at the engine core to first scheduling", _LONG_BUCKETS
        )
        self.step_time = histogram("engine_step_seconds", "Model time of one engine step", _LATENCY_BUCKETS)
        self.cache_queries = counter(
            "prefix_cache_queries_tokens", "Prompt tokens looked up in the prefix cache"
        )
        self.cache_hits = counter("prefix_cache_hits_tokens", "Prompt tokens found in the prefix cache")
        self.preemptions = counter("preemptions", "Requests preempted for KV blocks")
        self.kv_usage = gauge("kv_cache_usage_ratio", "Share of KV blocks held by requests")
        self.kv_blocks = gauge("kv_blocks", "KV blocks by state (free, used, cached)", "state")
        self.running = gauge("num_requests_running", "Requests in the running batch")
        self.waiting = gauge("num_requests_waiting", "Requests waiting for admission")
        self._last_load: LoadSnapshot | None = None

    def _counter(self, name: str, doc: str, *labels: str) -> Counter:
        return Counter(f"prefixgate_{name}", doc, labels, registry=self.registry)

    def _gauge(self, name: str, doc: str, *labels: str) -> Gauge:
        return Gauge(f"prefixgate_{name}", doc, labels, registry=self.registry)

    def _histogram(self, name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
        return Histogram(f"prefixgate_{name}", doc, buckets=buckets, registry=self.registry)

    def observe_load(self, load: LoadSnapshot, step_seconds: float) -> None:
        last = self._last_load
        if last is not None:
            # The core's counters are cumulative; Prometheus counters only go up by deltas.
            self.preemptions.inc(max(0, load.num_preemptions - last.num_preemptions))
            self.cache_queries.inc(max(0, load.prompt_tokens_admitted - last.prompt_tokens_admitted))
            self.cache_hits.inc(max(0, load.cached_tokens_admitted - last.cached_tokens_admitted))
        self._last_load = load
        self.kv_usage.set(load.kv_usage)
        self.kv_blocks.labels("free").set(load.free_blocks)
        self.kv_blocks.labels("used").set(load.used_blocks)
        self.kv_blocks.labels("cached").set(load.cached_blocks)
        self.running.set(load.running)
        self.waiting.set(load.waiting)
        if step_seconds > 0:
            self.step_time.observe(step_seconds)

    def observe_finished(
        self,
        reason: str,
        prompt_tokens: int,
        arrival: float,
        first_token: float | None,
        last_token: float | None,
        num_tokens: int,
        now: float,
    ) -> None:
        self.finished.labels(reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.e2e.observe(now - arrival)
        if first_token is not None and last_token is not None and num_tokens > 1:
            self.tpot.observe((last_token - first_token) / (num_tokens - 1))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class HttpMetricsMiddleware:
    """Counts every HTTP response by route template and status (errors included)."""

    def __init__(self, app: Any, metrics: ServerMetrics, routes: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        route = path if path in self.routes else "other"

        async def counting_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                self.metrics.http_requests.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
