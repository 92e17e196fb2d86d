"""One trace across processes: the client's span, the gateway's span, the replica's engine span.

A real replica and a real gateway each write their spans to a JSON-lines file
(PREFIXGATE_TRACE_FILE); the client side is an in-memory OpenTelemetry SDK provider here,
whose span's `traceparent` goes out with the official OpenAI SDK's requests.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

pytestmark = pytest.mark.slow

PROMPT = "You are a careful assistant. " * 20


@pytest.fixture(scope="module")
def traced(procs, engine_cmd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("traces")
    engine_args, engine_env = engine_cmd
    engine_file, gateway_file = folder / "engine.jsonl", folder / "gateway.jsonl"
    replica = procs(engine_args, env={**engine_env, "PREFIXGATE_TRACE_FILE": str(engine_file)})
    replica.wait_ready()
    gateway = procs(
        ["gateway", "--log-level", "warning", "--replica", replica.url],
        env={"PREFIXGATE_TRACE_FILE": str(gateway_file)},
    ).wait_ready(60)
    yield {"replica": replica, "gateway": gateway, "engine_file": engine_file, "gateway_file": gateway_file}


class ClientTracer:
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = provider.get_tracer("test-client")

    def headers(self, span: trace.Span) -> dict[str, str]:
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        return carrier


def _spans(path: Path, trace_id: str, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    """The spans of `trace_id` in `path`, once `count` of them are there (spans end after the response)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        found = [s for s in map(json.loads, lines) if s["trace_id"] == trace_id]
        if len(found) >= count or time.monotonic() > deadline:
            assert len(found) == count, (found, lines[-5:])
            return found
        time.sleep(0.05)


def _events(span: dict[str, Any]) -> list[str]:
    return [e["name"] for e in span["events"]]


def test_one_trace_covers_client_gateway_and_engine(traced) -> None:
    client_tracing = ClientTracer()
    gateway, replica = traced["gateway"], traced["replica"]
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "system", "content": PROMPT}, {"role": "user", "content": "Name a colour."}]

    usages = []
    for attempt in range(2):  # the second time the prefix is cached, and the spans say so
        with client_tracing.tracer.start_as_current_span(f"agent step {attempt}") as span:
            completion = client.chat.completions.create(
                model="default",
                messages=messages,
                max_tokens=6,
                temperature=0,
                extra_headers=client_tracing.headers(span),
            )
        usages.append(completion.usage)
        client_span = client_tracing.exporter.get_finished_spans()[-1]
        trace_id = f"{client_span.context.trace_id:032x}"
        client_span_id = f"{client_span.context.span_id:016x}"

        (gateway_span,) = _spans(traced["gateway_file"], trace_id, 1)
        (engine_span,) = _spans(traced["engine_file"], trace_id, 1)
        # Parent links: client -> gateway -> engine, in one trace.
        assert gateway_span["parent_span_id"] == client_span_id
        assert engine_span["parent_span_id"] == gateway_span["span_id"]
        assert gateway_span["service"] == "prefixgate-gateway"
        assert engine_span["service"] == "prefixgate-engine"
        assert gateway_span["kind"] == engine_span["kind"] == "SERVER"
        assert gateway_span["status"] == engine_span["status"] == "UNSET"

        usage = completion.usage
        cached = usage.prompt_tokens_details.cached_tokens
        g = gateway_span["attributes"]
        assert g["gen_ai.operation.name"] == "chat"
        assert g["gen_ai.request.model"] == "default"
        assert g["gen_ai.request.max_tokens"] == 6
        assert g["gen_ai.response.id"] == completion.id
        assert g["gen_ai.usage.input_tokens"] == usage.prompt_tokens
        assert g["gen_ai.usage.output_tokens"] == usage.completion_tokens
        assert g["gen_ai.usage.cache_read.input_tokens"] == cached
        assert g["gen_ai.response.finish_reasons"] == [completion.choices[0].finish_reason]
        assert g["prefixgate.route.policy"] == "kv_aware"
        assert g["prefixgate.route.replica"] == replica.url
        assert g["prefixgate.route.replicas"] == [replica.url]
        (predicted_blocks,) = g["prefixgate.route.predicted_cached_blocks"]
        assert g["prefixgate.route.predicted_cached_tokens"] == predicted_blocks * 16
        assert _events(gateway_span) == ["routed", "first_token"]

        e = engine_span["attributes"]
        assert e["gen_ai.usage.input_tokens"] == usage.prompt_tokens
        assert e["gen_ai.usage.output_tokens"] == usage.completion_tokens
        assert e["gen_ai.usage.cache_read.input_tokens"] == cached
        assert e["prefixgate.engine.prefill_tokens"] == usage.prompt_tokens - cached
        assert e["prefixgate.engine.prefill_chunks"] >= 1
        assert _events(engine_span) == ["queued", "scheduled", "first_token", "finished"]
        times = [ev["time_ns"] for ev in engine_span["events"]]
        assert times == sorted(times)
        # The engine span lies within the gateway span.
        assert gateway_span["start_ns"] <= engine_span["start_ns"] <= engine_span["end_ns"]

    assert usages[0].prompt_tokens_details.cached_tokens == 0
    assert usages[1].prompt_tokens_details.cached_tokens > 0
    second_gateway = _spans(traced["gateway_file"], trace_id, 1)[0]["attributes"]
    assert (
        second_gateway["prefixgate.route.predicted_cached_tokens"]
        == usages[1].prompt_tokens_details.cached_tokens
    )
    assert second_gateway["prefixgate.route.reason"] == "cache_hit"


def test_a_stream_straight_to_the_replica_is_traced_and_an_untraced_call_starts_a_trace(traced) -> None:
    client_tracing = ClientTracer()
    replica = traced["replica"]
    client = openai.OpenAI(base_url=replica.url + "/v1", api_key="unused", max_retries=0)
    with client_tracing.tracer.start_as_current_span("direct") as span:
        stream = client.completions.create(
            model="default",
            prompt="Once upon a time",
            max_tokens=5,
            stream=True,
            extra_headers=client_tracing.headers(span),
        )
        text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert text
    client_span = client_tracing.exporter.get_finished_spans()[-1]
    (engine_span,) = _spans(traced["engine_file"], f"{client_span.context.trace_id:032x}", 1)
    assert engine_span["parent_span_id"] == f"{client_span.context.span_id:016x}"
    assert engine_span["attributes"]["gen_ai.usage.output_tokens"] == 5

    # No traceparent: the gateway's span is a root of a new trace, and the engine's its child.
    gateway = traced["gateway"]
    gateway_file: Path = traced["gateway_file"]

    def gateway_lines() -> list[str]:  # no file until the gateway's first span (run alone: none yet)
        return gateway_file.read_text().splitlines() if gateway_file.exists() else []

    before = len(gateway_lines())
    openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused").completions.create(
        model="default", prompt="Hello", max_tokens=2
    )
    deadline = time.monotonic() + 20
    while len(gateway_lines()) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    root = json.loads(gateway_lines()[before])
    assert root["parent_span_id"] is None
    assert root["attributes"]["gen_ai.operation.name"] == "text_completion"
    (child,) = _spans(traced["engine_file"], root["trace_id"], 1)
    assert child["parent_span_id"] == root["span_id"]
