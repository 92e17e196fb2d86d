"""The replica server's one configuration object, frozen at start."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.config import EngineConfig


@dataclass(frozen=True, slots=True)
class ServerConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"
    port: int = 8000
    # The model name clients send and /v1/models lists; default: the engine's model id.
    served_model_name: str | None = None
    # Requests allowed to queue beyond the running batch (max_num_seqs); one more gets 429.
    max_waiting: int = 256
    retry_after_s: int = 1
    # max_tokens when a request sends none: what fits in the context, capped here, because
    # a 135M model on a 2-core CPU takes ~0.1 s per token (vLLM fills the whole context).
    default_max_tokens: int = 256
    # On SIGTERM: stop taking requests, let running ones finish for up to this long.
    drain_timeout_s: float = 30.0
    # Step batches of KV events held for one slow /kv/events subscriber before it is cut off
    # (it then reconnects and starts from a fresh snapshot).
    kv_subscriber_buffer: int = 10_000
    # An idle /kv/events stream sends a heartbeat this often, so a dead peer is noticed.
    kv_heartbeat_s: float = 1.0
    # Work in flight and the engine core process silent this long (it stamps a shared clock
    # every 0.5 s from a thread): the core is hung (/health 503, heartbeats stop).
    core_stall_s: float = 5.0
    # Work in flight and no engine step finished for this long: hung inside a step (a wedged
    # GPU call). Long, because one CPU step of a 2,048-token chunk can take ~10 s.
    core_progress_timeout_s: float = 300.0
    log_level: str = "info"
    # A JSON line per engine step, appended to this file (engine/step_log.py); None: off.
    step_log: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be non-negative, got {self.max_waiting}")
        if self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be positive, got {self.default_max_tokens}")
        if self.drain_timeout_s < 0 or self.kv_heartbeat_s <= 0 or self.kv_subscriber_buffer < 1:
            raise ValueError("drain_timeout_s, kv_heartbeat_s and kv_subscriber_buffer must be positive")
        if self.core_stall_s <= self.kv_heartbeat_s or self.core_progress_timeout_s <= 0:
            raise ValueError(
                "core_stall_s must be longer than kv_heartbeat_s; core_progress_timeout_s positive"
            )

    @property
    def max_in_flight(self) -> int:
        """Engine requests (n > 1 counts n) the replica holds at once: running plus waiting."""
        return self.engine.max_num_seqs + self.max_waiting
