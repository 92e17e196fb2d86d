"""The two spans of a generation: the gateway's (routing) and the engine's (queue, prefill, decode).

Both carry the gen_ai semantic-convention attributes; ours are under `prefixgate.`. A span
object is created per request whether tracing is on or not; with tracing off every method
returns at once, so the request path pays nothing but a call.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence

from opentelemetry import trace
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as gen_ai
from opentelemetry.trace import SpanKind, Status, StatusCode

from traces.propagation import context_from_headers, headers_for
from traces.setup import enabled

_tracer = trace.get_tracer("prefixgate")
PROVIDER = "prefixgate"


def _now_ns() -> int:
    return time.time_ns()


class _Span:
    """A started span (or nothing, when tracing is off) with an idempotent end."""

    def __init__(self, name: str, headers: Mapping[str, str], attributes: Mapping[str, object]) -> None:
        self.span: trace.Span | None = None
        if enabled():
            self.span = _tracer.start_span(
                name,
                context=context_from_headers(headers),
                kind=SpanKind.SERVER,
                attributes={k: v for k, v in attributes.items() if v is not None},  # type: ignore[misc]
            )

    @property
    def recording(self) -> bool:
        return self.span is not None

    def set(self, attributes: Mapping[str, object]) -> None:
        if self.span is not None:
            self.span.set_attributes({k: v for k, v in attributes.items() if v is not None})  # type: ignore[misc]

    def event(self, name: str, attributes: Mapping[str, object] | None = None) -> None:
        if self.span is not None:
            self.span.add_event(name, dict(attributes or {}))  # type: ignore[arg-type]

    def downstream_headers(self) -> dict[str, str]:
        return headers_for(self.span) if self.span is not None else {}

    def end(self, error: str | None = None) -> None:
        span, self.span = self.span, None
        if span is None:
            return
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end()


class GatewaySpan(_Span):
    """One client request at the gateway: what was asked, where it went and why, what came back."""

    def __init__(
        self,
        operation: str,
        model: str,
        headers: Mapping[str, str],
        *,
        max_tokens: int | None,
        temperature: float | None,
        top_p: float | None,
        n: int,
        seed: int | None,
        stream: bool,
    ) -> None:
        super().__init__(
            f"{operation} {model}",
            headers,
            {
                gen_ai.GEN_AI_OPERATION_NAME: operation,
                gen_ai.GEN_AI_PROVIDER_NAME: PROVIDER,
                gen_ai.GEN_AI_REQUEST_MODEL: model,
                gen_ai.GEN_AI_REQUEST_MAX_TOKENS: max_tokens,
                gen_ai.GEN_AI_REQUEST_TEMPERATURE: temperature,
                gen_ai.GEN_AI_REQUEST_TOP_P: top_p,
                gen_ai.GEN_AI_REQUEST_CHOICE_COUNT: n if n != 1 else None,
                gen_ai.GEN_AI_REQUEST_SEED: seed,
                gen_ai.GEN_AI_REQUEST_STREAM: stream,
            },
        )

    def routed(
        self,
        *,
        policy: str,
        replica: str,
        reason: str,
        prompt_tokens: int,
        predicted_cached_tokens: int,
        matched_blocks: Mapping[str, int],
        attempt: int,
    ) -> None:
        """One routing decision (a retry adds another event and overwrites the attributes)."""
        if self.span is None:
            return
        replicas = sorted(matched_blocks)
        attributes = {
            "prefixgate.route.policy": policy,
            "prefixgate.route.replica": replica,
            "prefixgate.route.reason": reason,
            "prefixgate.route.attempt": attempt,
            "prefixgate.route.prompt_tokens": prompt_tokens,
            "prefixgate.route.predicted_cached_tokens": predicted_cached_tokens,
            # Two parallel arrays: OpenTelemetry attributes hold no maps.
            "prefixgate.route.replicas": replicas,
            "prefixgate.route.predicted_cached_blocks": [matched_blocks[r] for r in replicas],
        }
        self.span.set_attributes(attributes)
        self.span.add_event("routed", attributes)

    def response_id(self, response_id: str) -> None:
        self.set({gen_ai.GEN_AI_RESPONSE_ID: response_id})

    def first_token(self) -> None:
        self.event("first_token")

    def finished(
        self,
        *,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int,
        finish_reasons: Iterable[str | None],
        retries: int,
    ) -> None:
        self.set(
            {
                gen_ai.GEN_AI_USAGE_INPUT_TOKENS: prompt_tokens,
                gen_ai.GEN_AI_USAGE_OUTPUT_TOKENS: completion_tokens,
                gen_ai.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS: cached_tokens,
                gen_ai.GEN_AI_RESPONSE_FINISH_REASONS: [r or "" for r in finish_reasons],
                "prefixgate.route.retries": retries,
            }
        )


class EngineSpan(_Span):
    """One generation inside a replica: queued, scheduled, prefilled in chunks, first token, done."""

    def __init__(self, model: str, headers: Mapping[str, str], request_ids: Sequence[str]) -> None:
        super().__init__(
            f"engine generate {model}",
            headers,
            {
                gen_ai.GEN_AI_OPERATION_NAME: "generate",
                gen_ai.GEN_AI_PROVIDER_NAME: PROVIDER,
                gen_ai.GEN_AI_REQUEST_MODEL: model,
                "prefixgate.engine.request_ids": list(request_ids),
            },
        )
        self._arrival_ns = _now_ns()
        self._first = True
        self._output_tokens = 0
        if self.span is not None:
            self.span.add_event("queued", timestamp=self._arrival_ns)

    def step(
        self,
        *,
        new_tokens: int,
        prompt_tokens: int,
        cached_tokens: int,
        queue_time_s: float | None,
        prefill_chunks: int | None,
    ) -> None:
        """A delta from the core; the first one carries the request's admission facts."""
        if self.span is None:
            return
        self._output_tokens += new_tokens
        if not self._first:
            return
        self._first = False
        if queue_time_s is not None:
            self.span.add_event("scheduled", timestamp=self._arrival_ns + int(queue_time_s * 1e9))
        self.span.add_event(
            "first_token", {"prefixgate.engine.prefill_chunks": prefill_chunks or 0}, timestamp=_now_ns()
        )
        self.span.set_attributes(
            {
                gen_ai.GEN_AI_USAGE_INPUT_TOKENS: prompt_tokens,
                gen_ai.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS: cached_tokens,
                "prefixgate.engine.prefill_tokens": prompt_tokens - cached_tokens,
                "prefixgate.engine.prefill_chunks": prefill_chunks or 0,
                "prefixgate.engine.queue_time_s": queue_time_s or 0.0,
            }
        )

    def finish(self, finish_reasons: Iterable[str | None], error: str | None = None) -> None:
        if self.span is not None:
            self.span.set_attribute(gen_ai.GEN_AI_USAGE_OUTPUT_TOKENS, self._output_tokens)
            self.span.set_attribute(gen_ai.GEN_AI_RESPONSE_FINISH_REASONS, [r or "" for r in finish_reasons])
            self.span.add_event("finished")
        self.end(error)
