"""Which exporters the standard environment variables turn on (no process-wide state touched)."""

from __future__ import annotations

import json
from pathlib import Path

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from traces.file_exporter import JsonLinesSpanExporter
from traces.setup import _processors


def _kinds(environ: dict[str, str]) -> list[str]:
    out = []
    for processor in _processors(environ):
        exporter = processor.span_exporter  # type: ignore[attr-defined]
        out.append(f"{type(processor).__name__}:{type(exporter).__name__}")
        processor.shutdown()
    return out


def test_off_unless_asked(tmp_path: Path) -> None:
    assert _kinds({}) == []
    assert _kinds({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318"}) == []
    assert _kinds({"OTEL_SDK_DISABLED": "true", "PREFIXGATE_TRACE_FILE": str(tmp_path / "t")}) == []


def test_otlp_console_and_file(tmp_path: Path) -> None:
    assert _kinds({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}) == [
        "BatchSpanProcessor:OTLPSpanExporter"
    ]
    assert _kinds({"OTEL_TRACES_EXPORTER": "console,otlp"}) == [
        "BatchSpanProcessor:OTLPSpanExporter",
        "SimpleSpanProcessor:ConsoleSpanExporter",
    ]
    assert _kinds({"PREFIXGATE_TRACE_FILE": str(tmp_path / "t")}) == [
        "SimpleSpanProcessor:JsonLinesSpanExporter"
    ]


def test_file_exporter_writes_parent_links_and_events(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(path)))
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("outer") as outer, tracer.start_as_current_span("inner") as inner:
        inner.add_event("step", {"n": 3})
        inner.set_attribute("xs", [1, 2])
    inner_record, outer_record = (json.loads(line) for line in path.read_text().splitlines())
    assert inner_record["name"] == "inner" and outer_record["name"] == "outer"
    assert inner_record["trace_id"] == outer_record["trace_id"] == f"{outer.get_span_context().trace_id:032x}"
    assert inner_record["parent_span_id"] == outer_record["span_id"]
    assert outer_record["parent_span_id"] is None
    assert inner_record["events"][0]["name"] == "step" and inner_record["events"][0]["attributes"] == {"n": 3}
    assert inner_record["attributes"] == {"xs": [1, 2]}
