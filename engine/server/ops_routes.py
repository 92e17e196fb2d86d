"""GET /health, /load, /metrics and /debug/cache."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get

from engine.server.errors import ApiError
from engine.server.protocol import DebugState, LoadReport
from engine.server.replica import json_response, replica_of


@get("/health")
async def health(request: Request[Any, Any, Any]) -> Response[Any]:
    """200 only once the model is loaded and warmed, and while the replica takes requests."""
    client = replica_of(request).client
    if client.failure is not None:
        return json_response({"status": "failed", "detail": client.failure}, 503)
    if client.draining:
        return json_response({"status": "draining"}, 503)
    if client.ready is None:
        return json_response({"status": "loading"}, 503)
    if client.stalled:
        return json_response({"status": "stalled", "detail": "the engine has made no progress"}, 503)
    return json_response({"status": "ready", "model": client.ready.model_id})


@get("/load")
async def load(request: Request[Any, Any, Any]) -> Response[Any]:
    replica = replica_of(request)
    snapshot = replica.client.load
    if snapshot is None:
        replica.ready  # noqa: B018 - raises the 503 that says why
        raise ApiError(503, "no load snapshot yet")
    return json_response(
        LoadReport(
            model=replica.model_name,
            in_flight=replica.client.in_flight,
            max_in_flight=replica.config.max_in_flight,
            engine=snapshot,
        )
    )


@get("/metrics")
async def metrics(request: Request[Any, Any, Any]) -> Response[Any]:
    body, content_type = replica_of(request).metrics.render()
    # prometheus_client's type names its charset; Litestar would append a second one.
    return Response(body, media_type=content_type.replace("; charset=utf-8", ""))


@get("/debug/cache")
async def debug_cache(request: Request[Any, Any, Any]) -> Response[Any]:
    """The core's requests, cached block hashes and an integrity check, taken between steps."""
    client = replica_of(request).client
    state = await client.inspect()
    return json_response(
        DebugState(
            running=state.running,
            waiting=state.waiting,
            in_flight=client.in_flight,
            load=state.load,
            cached_block_hashes=state.cached_block_hashes,
            last_seq=state.last_seq,
            integrity_error=state.integrity_error,
        )
    )


ROUTES = [health, load, metrics, debug_cache]
