"""W3C trace context across HTTP hops: read a client's `traceparent`, write ours downstream."""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry import propagate, trace
from opentelemetry.context import Context


def context_from_headers(headers: Mapping[str, str]) -> Context:
    """The caller's trace context (an empty one when it sent no valid `traceparent`)."""
    return propagate.extract(headers)


def headers_for(span: trace.Span) -> dict[str, str]:
    """`traceparent` (and `tracestate`) headers that make `span` the parent downstream."""
    carrier: dict[str, str] = {}
    if span.get_span_context().is_valid:
        propagate.inject(carrier, context=trace.set_span_in_context(span))
    return carrier
