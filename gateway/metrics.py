"""Prometheus metrics of the gateway (GET /metrics), in their own registry.

Predicted vs delivered cache hits: `predicted` is what the routing decision expected the
chosen replica to reuse (from the prefix index), `delivered` the cached_tokens the replica
reported on the request's first frame. Their ratio says how exact the index is.
"""

from __future__ import annotations

from collections.abc import Callable
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

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class GatewayMetrics:
    def __init__(self) -> None:
        disable_created_metrics()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "prefixgate_gateway_requests",
            "Requests sent to a replica, by outcome",
            ["replica", "outcome"],
            registry=r,
        )
        self.decisions = Counter(
            "prefixgate_gateway_routing_decisions",
            "Routing decisions, by policy and reason",
            ["policy", "reason"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "prefixgate_gateway_prompt_tokens", "Prompt tokens routed, by replica", ["replica"], registry=r
        )
        self.predicted_cached = Counter(
            "prefixgate_gateway_predicted_cached_tokens",
            "Prompt tokens the routing decision expected the replica to have cached",
            ["replica"],
            registry=r,
        )
        self.delivered_cached = Counter(
            "prefixgate_gateway_delivered_cached_tokens",
            "Prompt tokens the replica reported as cached (usage cached_tokens)",
            ["replica"],
            registry=r,
        )
        self.in_flight = Gauge(
            "prefixgate_gateway_in_flight_requests", "Requests in flight, by replica", ["replica"], registry=r
        )
        self.retries = Counter(
            "prefixgate_gateway_retries",
            "Requests retried on another replica before their first token",
            ["replica"],
            registry=r,
        )
        self.healthy = Gauge(
            "prefixgate_gateway_replica_healthy", "1 while the replica takes traffic", ["replica"], registry=r
        )
        self.index_blocks = Gauge(
            "prefixgate_gateway_index_blocks",
            "Block hashes in the replica's prefix index",
            ["replica"],
            registry=r,
        )
        self.ttft = Histogram(
            "prefixgate_gateway_time_to_first_token_seconds",
            "Arrival to first token",
            buckets=_BUCKETS,
            registry=r,
        )
        self.admitted = Gauge(
            "prefixgate_gateway_admitted_requests",
            "Completion requests in flight at the gateway (admitted, answer not yet ended)",
            registry=r,
        )
        self.refused = Counter(
            "prefixgate_gateway_refused_requests",
            "Requests answered by the gateway's front before any handler, by reason",
            ["reason"],
            registry=r,
        )
        self.routing_time = Histogram(
            "prefixgate_gateway_routing_seconds",
            "Tokenize, hash, match and choose",
            buckets=_BUCKETS,
            registry=r,
        )

    def watch_admitted(self, in_flight: Callable[[], float]) -> None:
        """Read the admission count at scrape time: no gauge update on the request path."""
        self.admitted.set_function(in_flight)

    def child(self, metric: Counter | Gauge, *labels: str) -> Any:
        """`metric.labels(*labels)`, kept: labels() takes a lock and builds its key on every
        call, several times per request. Label values are replicas, outcomes, policies and
        reasons (few), and no child is ever removed, so the dict stays small and exact."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
