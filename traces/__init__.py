"""OpenTelemetry set-up and span helpers shared by the gateway and the engine server."""

from traces.propagation import context_from_headers, headers_for
from traces.setup import configure_tracing, enabled, shutdown_tracing

__all__ = ["configure_tracing", "context_from_headers", "enabled", "headers_for", "shutdown_tracing"]
