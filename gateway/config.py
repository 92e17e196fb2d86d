"""The gateway's one configuration object, frozen at start."""

from __future__ import annotations

from dataclasses import dataclass, field

from policies.routing import DEFAULT_ROUTING_POLICY, ROUTING_POLICIES


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    # Our engine replicas: /internal/info, /internal/generate, /kv/events, /load.
    replicas: tuple[str, ...] = ()
    # OpenAI-compatible servers that publish no KV events: routed by an approximate index.
    foreign_replicas: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8080
    policy: str = DEFAULT_ROUTING_POLICY
    # A tokenizer folder for replicas whose model folder is not on this host (and for foreign ones).
    tokenizer: str | None = None
    # The model name foreign replicas serve, when /v1/models cannot be asked.
    foreign_model: str | None = None
    load_interval_s: float = 0.5  # GET /load of each healthy replica this often
    health_interval_s: float = 1.0  # foreign replicas: GET /v1/models this often
    reconnect_max_s: float = 2.0  # backoff cap for a replica that is down
    failure_threshold: int = 2  # consecutive request failures that open the circuit breaker
    max_attempts: int = 3  # replicas tried for one request before its first token
    connect_timeout_s: float = 5.0
    # A replica whose /kv/events stream (events or heartbeats, ~1 s apart) is silent this long
    # is hung: it leaves the pool and its requests are failed (retried if not yet streaming).
    liveness_timeout_s: float = 5.0
    # A request to a replica that has had no byte back for this long is failed: the deadline
    # for an engine stuck behind a live HTTP front. Covers queueing, so it is generous.
    upstream_idle_timeout_s: float = 300.0
    approximate_ttl_s: float = 120.0
    approximate_max_blocks: int = 1 << 16
    max_sessions: int = 100_000
    log_level: str = "info"
    # Access (gateway/auth.py): API keys from a JSON/TOML file and/or (key, tenant) pairs; none
    # configured leaves the gateway open. Secrets are kept out of repr, so out of logs.
    api_keys_file: str | None = None
    api_keys: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    admin_key: str | None = field(default=None, repr=False)
    salt_secret: str | None = field(default=None, repr=False)  # keys tenants' cache salts
    # Overload and size bounds (gateway/admission.py, gateway/app.py).
    max_in_flight: int = 4096  # completion requests in flight at the gateway; beyond, 429
    retry_after_s: int = 1  # the Retry-After of that 429
    max_body_bytes: int = 16 << 20  # a larger request body gets 413

    def __post_init__(self) -> None:
        if self.policy not in ROUTING_POLICIES:
            raise ValueError(f"unknown routing policy {self.policy!r} (known: {sorted(ROUTING_POLICIES)})")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_in_flight < 1 or self.retry_after_s < 0 or self.max_body_bytes < 1:
            raise ValueError("max_in_flight and max_body_bytes must be positive, retry_after_s not negative")
        if self.failure_threshold < 1 or self.max_attempts < 1:
            raise ValueError("failure_threshold and max_attempts must be positive")
        if (
            min(
                self.load_interval_s,
                self.health_interval_s,
                self.reconnect_max_s,
                self.liveness_timeout_s,
                self.upstream_idle_timeout_s,
            )
            <= 0
        ):
            raise ValueError("intervals must be positive")
