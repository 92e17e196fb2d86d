"""OpenAPI for the replica and the gateway: the schema Litestar generates, plus what it cannot see.

The completion handlers read their body raw and decode it with msgspec themselves (for 400s
that name the field, engine/server/errors.py), so Litestar's generated schema has no request
bodies and its error responses describe Litestar's own error shape. `documented` adds each
operation's request body and JSON answer from the very msgspec Structs the handlers decode
and encode, and describes every 4xx as the OpenAI-style error body both servers send. Served
at GET /schema/openapi.json; bench/fuzz_api.py points schemathesis at it.

Torch-free: the gateway imports it too.
"""

from __future__ import annotations

import copy
import importlib.metadata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
from litestar import Request
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin

from engine.sampling_params import MAX_N, MAX_TOP_LOGPROBS
from engine.server.openai_types import (
    MIN_REPETITION_PENALTY,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from engine.server.protocol import DebugState, GenerateRequest, LoadReport, ReplicaInfo

SCHEMA_PATH = "/schema/openapi.json"
_REF = "#/components/schemas/{name}"
_JSON = "application/json"
_SSE = "text/event-stream"
_NDJSON = "application/x-ndjson"
_MSGPACK_STREAM = "application/vnd.msgpack"
_PROMETHEUS = "text/plain"
# One server-sent event (OpenAPI 3.1 has `schema` describe each): its data is a JSON chunk,
# an error body, or "[DONE]".
_SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}


@dataclass(frozen=True, slots=True)
class Documented:
    """What one operation takes and answers, where Litestar cannot tell from its signature."""

    body: type | None = None  # the Struct decoded from the JSON request body
    answer: type | None = None  # the Struct of a 200 JSON answer
    other_media: tuple[str, ...] = ()  # media types of a 200 answer that is not JSON (streams, text)


# Every prompt shape /v1/completions takes; the Struct says `str | list[Any]` because msgspec
# cannot tell list shapes apart in a union (engine/server/openai_inputs.py does).
_TOKEN_IDS: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
_PROMPT_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
        _TOKEN_IDS,
        {"type": "array", "minItems": 1, "items": _TOKEN_IDS},
    ]
}

# The ranges SamplingParams.problem() and openai_inputs.py accept, so that schemathesis'
# positive data reaches the engine and its negative data probes each bound. Only the
# schema says this; the Structs decode any number, for 400s worded in one place.
_BOUNDS: dict[str, dict[str, float]] = {
    "max_tokens": {"minimum": 1},
    "max_completion_tokens": {"minimum": 1},
    "n": {"minimum": 1, "maximum": MAX_N},
    "best_of": {"minimum": 1, "maximum": MAX_N},
    "temperature": {"minimum": 0, "maximum": 100},
    "top_p": {"exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"minimum": -1},
    "min_p": {"minimum": 0, "maximum": 1},
    "repetition_penalty": {"minimum": MIN_REPETITION_PENALTY, "maximum": 100},
    "presence_penalty": {"minimum": -2, "maximum": 2},
    "frequency_penalty": {"minimum": -2, "maximum": 2},
    "logprobs": {"minimum": 0, "maximum": MAX_TOP_LOGPROBS},
    "top_logprobs": {"minimum": 0, "maximum": MAX_TOP_LOGPROBS},
    "seed": {"minimum": -(1 << 63), "maximum": (1 << 64) - 1},
}
_BOUNDED = ("ChatCompletionRequest", "CompletionRequest", "GenerateRequest")


def _bound(components: dict[str, Any]) -> None:
    for name in _BOUNDED:
        properties = components.get(name, {}).get("properties", {})
        for field_name, bounds in _BOUNDS.items():
            prop = properties.get(field_name)
            if prop is None:
                continue
            for branch in prop.get("anyOf", [prop]):
                if branch.get("type") in ("integer", "number"):
                    branch.update(bounds)


OPENAI_OPERATIONS: dict[tuple[str, str], Documented] = {
    ("/v1/chat/completions", "post"): Documented(ChatCompletionRequest, ChatCompletion, (_SSE,)),
    ("/v1/completions", "post"): Documented(CompletionRequest, Completion, (_SSE,)),
    ("/v1/models", "get"): Documented(answer=ModelList),
    ("/v1/models/{model}", "get"): Documented(answer=ModelCard),
    ("/metrics", "get"): Documented(other_media=(_PROMETHEUS,)),
}

REPLICA_OPERATIONS: dict[tuple[str, str], Documented] = {
    **OPENAI_OPERATIONS,
    ("/internal/generate", "post"): Documented(GenerateRequest, other_media=(_NDJSON, _MSGPACK_STREAM)),
    ("/internal/info", "get"): Documented(answer=ReplicaInfo),
    ("/load", "get"): Documented(answer=LoadReport),
    ("/debug/cache", "get"): Documented(answer=DebugState),
    ("/kv/events", "get"): Documented(other_media=(_NDJSON,)),
}


def documented(
    generated: Mapping[str, Any], operations: Mapping[tuple[str, str], Documented]
) -> dict[str, Any]:
    """Litestar's schema with request bodies, 200 answers and OpenAI-style 4xx bodies added."""
    schema = copy.deepcopy(dict(generated))
    structs = {t for d in operations.values() for t in (d.body, d.answer) if t is not None}
    ordered = sorted(structs, key=lambda t: t.__name__)
    refs, components = msgspec.json.schema_components([*ordered, ErrorResponse], ref_template=_REF)
    ref_of = dict(zip([*ordered, ErrorResponse], refs, strict=True))
    if "CompletionRequest" in components:
        components["CompletionRequest"]["properties"]["prompt"] = _PROMPT_SCHEMA
    _bound(components)
    for name, field_name in (("GenerateRequest", "token_ids"), ("ChatCompletionRequest", "messages")):
        if name in components:
            components[name]["properties"][field_name]["minItems"] = 1
    schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
    error = {
        "description": "An OpenAI-style error naming the field at fault",
        "content": {_JSON: {"schema": ref_of[ErrorResponse]}},
    }
    for path, methods in schema.get("paths", {}).items():
        for method, operation in methods.items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            responses = operation["responses"]
            for status in [s for s in responses if s.startswith("4")]:
                del responses[status]  # Litestar's own error shape, which these servers never send
            responses["4XX"] = error
            doc = operations.get((path, method))
            if doc is None:
                continue
            if doc.body is not None:
                body = {_JSON: {"schema": ref_of[doc.body]}}
                operation["requestBody"] = {"required": True, "content": body}
            content: dict[str, Any] = {}
            if doc.answer is not None:
                content[_JSON] = {"schema": ref_of[doc.answer]}
            for media_type in doc.other_media:
                content[media_type] = {"schema": _SSE_EVENT if media_type == _SSE else {"type": "string"}}
            if content:
                responses["200"] = {"description": "OK", "content": content}
    return schema


class _DocumentedJson(JsonRenderPlugin):
    """Litestar's /openapi.json handler, serving `documented(...)` (built once, on first use)."""

    def __init__(self, operations: Mapping[tuple[str, str], Documented]) -> None:
        super().__init__(path="/openapi.json", media_type=_JSON)  # type: ignore[arg-type]
        self.operations = operations
        self._rendered: bytes | None = None

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        if self._rendered is None:
            self._rendered = msgspec.json.encode(documented(openapi_schema, self.operations))
        return self._rendered


def _version() -> str:
    try:
        return importlib.metadata.version("prefixgate")
    except importlib.metadata.PackageNotFoundError:
        return "0"


def openapi_config(title: str, operations: Mapping[tuple[str, str], Documented]) -> OpenAPIConfig:
    """Serves GET /schema/openapi.json only: no documentation sites, nothing fetched from a CDN."""
    return OpenAPIConfig(
        title=title, version=_version(), path="/schema", render_plugins=[_DocumentedJson(operations)]
    )
