"""The gateway's Prometheus counters, scraped before and after a run and diffed.

From `gateway/metrics.py`: requests per replica and outcome, prompt tokens routed per replica,
the cached tokens the routing decision predicted and those the replica delivered (usage
cached_tokens), retries, and routing decisions per policy and reason. The diff gives the
predicted and delivered hit rate (cached / prompt tokens) overall and per replica, and each
replica's share of the load. The counters count attempts: a request the gateway retried on
another replica counts on both (see `retries`), so with retries the gateway's hit rates and the
responses' (bench/serve/report.py CacheStats) differ. A server without these counters (a
replica, sglang-router, vLLM) gives None.
"""

from __future__ import annotations

import aiohttp
import msgspec
from prometheus_client.parser import text_string_to_metric_families

PREFIX = "prefixgate_gateway_"
_COUNTERS = (
    "requests",
    "prompt_tokens",
    "predicted_cached_tokens",
    "delivered_cached_tokens",
    "retries",
    "routing_decisions",
)

Labels = tuple[tuple[str, str], ...]
Snapshot = dict[tuple[str, Labels], float]


class ReplicaLoad(msgspec.Struct, kw_only=True):
    replica: str
    requests: int
    requests_by_outcome: dict[str, int]
    request_share: float
    prompt_tokens: int
    prompt_token_share: float
    predicted_cached_tokens: int
    delivered_cached_tokens: int
    predicted_hit_rate: float
    delivered_hit_rate: float
    retries: int


class GatewayStats(msgspec.Struct, kw_only=True):
    policies: dict[str, int]  # routing decisions per policy during the run
    reasons: dict[str, int]  # ... and per reason
    requests: int
    prompt_tokens: int
    predicted_cached_tokens: int
    delivered_cached_tokens: int
    predicted_hit_rate: float
    delivered_hit_rate: float
    replicas: list[ReplicaLoad]


def parse_metrics(text: str) -> Snapshot:
    """The gateway's counter samples: (name without prefix and _total, sorted labels) -> value."""
    out: Snapshot = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.startswith(PREFIX) or not sample.name.endswith("_total"):
                continue
            name = sample.name[len(PREFIX) : -len("_total")]
            if name in _COUNTERS:
                out[(name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return out


async def scrape(session: aiohttp.ClientSession, base_url: str) -> Snapshot | None:
    """GET {base_url}/metrics; None if it is missing or holds none of the gateway's counters."""
    try:
        async with session.get(base_url.rstrip("/") + "/metrics") as response:
            if response.status != 200:
                return None
            text = await response.text()
    except (aiohttp.ClientError, TimeoutError):
        return None
    try:
        snapshot = parse_metrics(text)
    except ValueError:
        return None
    return snapshot if PREFIX in text else None


def _ratio(part: float, whole: float) -> float:
    return part / whole if whole > 0 else 0.0


def diff_stats(before: Snapshot, after: Snapshot) -> GatewayStats:
    """What happened between two snapshots (counters only grow; a new label starts at 0)."""
    delta: dict[str, dict[Labels, int]] = {name: {} for name in _COUNTERS}
    for key, value in after.items():
        name, labels = key
        change = round(value - before.get(key, 0.0))
        if change:
            delta[name][labels] = change

    def per(name: str, label: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for labels, value in delta[name].items():
            key = dict(labels).get(label, "")
            out[key] = out.get(key, 0) + value
        return out

    requests, prompts = per("requests", "replica"), per("prompt_tokens", "replica")
    predicted, delivered = (
        per("predicted_cached_tokens", "replica"),
        per("delivered_cached_tokens", "replica"),
    )
    retries = per("retries", "replica")
    total_requests, total_prompt = sum(requests.values()), sum(prompts.values())
    replicas = []
    for replica in sorted(set(requests) | set(prompts)):
        outcomes = {
            dict(labels)["outcome"]: value
            for labels, value in delta["requests"].items()
            if dict(labels).get("replica") == replica and "outcome" in dict(labels)
        }
        replicas.append(
            ReplicaLoad(
                replica=replica,
                requests=requests.get(replica, 0),
                requests_by_outcome=dict(sorted(outcomes.items())),
                request_share=_ratio(requests.get(replica, 0), total_requests),
                prompt_tokens=prompts.get(replica, 0),
                prompt_token_share=_ratio(prompts.get(replica, 0), total_prompt),
                predicted_cached_tokens=predicted.get(replica, 0),
                delivered_cached_tokens=delivered.get(replica, 0),
                predicted_hit_rate=_ratio(predicted.get(replica, 0), prompts.get(replica, 0)),
                delivered_hit_rate=_ratio(delivered.get(replica, 0), prompts.get(replica, 0)),
                retries=retries.get(replica, 0),
            )
        )
    total_predicted, total_delivered = sum(predicted.values()), sum(delivered.values())
    return GatewayStats(
        policies=per("routing_decisions", "policy"),
        reasons=per("routing_decisions", "reason"),
        requests=total_requests,
        prompt_tokens=total_prompt,
        predicted_cached_tokens=total_predicted,
        delivered_cached_tokens=total_delivered,
        predicted_hit_rate=_ratio(total_predicted, total_prompt),
        delivered_hit_rate=_ratio(total_delivered, total_prompt),
        replicas=replicas,
    )
