"""Tracing set-up from the standard OpenTelemetry environment variables, once per process.

- `OTEL_SDK_DISABLED=true`: off.
- `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) set: spans go to that
  collector over OTLP/HTTP, batched (the exporter retries, then drops quietly; requests never
  wait on it).
- `OTEL_TRACES_EXPORTER=console`: spans are printed to stderr (a list, like `console,otlp`,
  enables several).
- `PREFIXGATE_TRACE_FILE=path`: every span is appended to `path` as one JSON line when it ends
  (debugging, and how the tests read spans of other processes).
- Otherwise tracing is off: the OpenTelemetry API hands out non-recording spans and the
  helpers here skip the attribute work (`enabled()` is False).

`OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` are honoured by the SDK's Resource.
"""

from __future__ import annotations

import logging
import os

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

from traces.file_exporter import JsonLinesSpanExporter

log = logging.getLogger("prefixgate.traces")

TRACE_FILE_ENV = "PREFIXGATE_TRACE_FILE"
_provider: TracerProvider | None = None


def _processors(environ: os._Environ[str] | dict[str, str]) -> list[SpanProcessor]:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    processors: list[SpanProcessor] = []
    wanted = {name.strip().lower() for name in environ.get("OTEL_TRACES_EXPORTER", "").split(",")}
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if "none" in wanted:
        wanted, endpoint = set(), None
    if endpoint or "otlp" in wanted:
        # Imported only when asked for: it pulls protobuf and requests.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        processors.append(BatchSpanProcessor(OTLPSpanExporter()))  # reads the endpoint from the env
    if "console" in wanted:
        processors.append(SimpleSpanProcessor(ConsoleSpanExporter()))
    path = environ.get(TRACE_FILE_ENV)
    if path:
        processors.append(SimpleSpanProcessor(JsonLinesSpanExporter(path)))
    return processors


def configure_tracing(service_name: str, environ: dict[str, str] | None = None) -> bool:
    """Install the process's tracer provider from the environment; True if tracing is on.

    Called once at process start by the gateway and the replica; later calls change nothing.
    """
    global _provider
    if _provider is not None:
        return True
    processors = _processors(os.environ if environ is None else environ)
    if not processors:
        return False
    resource = Resource.create({SERVICE_NAME: service_name})  # OTEL_SERVICE_NAME overrides it
    provider = TracerProvider(resource=resource)
    for processor in processors:
        provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    _provider = provider
    log.info("tracing on (%s)", ", ".join(type(p).__name__ for p in processors))
    return True


def enabled() -> bool:
    return _provider is not None


def shutdown_tracing() -> None:
    """Flush and stop the exporters (process exit)."""
    if _provider is not None:
        _provider.shutdown()
