"""GET /health, /ready, /metrics; /admin/replicas to list, add and remove replicas at run time.

Every /admin route carries admin_guard (gateway/auth.py), also checked by the front in gateway/app.py.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, delete, get, post

from gateway.auth import admin_guard
from gateway.errors import ApiError, decode_json
from gateway.openai_api import registry_of

_encoder = msgspec.json.Encoder()


class AddReplica(msgspec.Struct, kw_only=True):
    url: str
    foreign: bool = False  # an OpenAI-compatible backend without KV events


def _json(body: Any, status: int = 200) -> Response[bytes]:
    return Response(_encoder.encode(body), status_code=status, media_type="application/json")


@get("/health")
async def health(request: Request[Any, Any, Any]) -> Response[Any]:
    """200 once every index has been loaded from its replica's snapshot and one replica is up."""
    registry = registry_of(request)
    if registry.ready:
        return _json({"status": "ready"})
    return _json({"status": "starting"}, 503)


@get("/ready")
async def ready(request: Request[Any, Any, Any]) -> Response[Any]:
    return await health.fn(request)  # type: ignore[no-any-return]


@get("/metrics")
async def metrics(request: Request[Any, Any, Any]) -> Response[Any]:
    body, content_type = registry_of(request).metrics.render()
    # prometheus_client's type names its charset; Litestar would append a second one.
    return Response(body, media_type=content_type.replace("; charset=utf-8", ""))


@get("/admin/replicas", guards=[admin_guard])
async def list_replicas(request: Request[Any, Any, Any]) -> Response[Any]:
    registry = registry_of(request)
    out = []
    for replica in registry.replicas.values():
        index_blocks = None
        pool = registry.pools.get(replica.model or "")
        if pool is not None and replica.url in pool.index:
            index_blocks = len(pool.index.index(replica.url))
        out.append(
            {
                "url": replica.url,
                "exact": replica.exact,
                "status": replica.status,
                "model": replica.model,
                "in_flight": replica.in_flight,
                "failures": replica.failures,
                "resyncs": replica.resyncs,
                "index_blocks": index_blocks,
                "last_error": replica.last_error,
            }
        )
    return _json({"replicas": out})


@post("/admin/replicas", status_code=201, guards=[admin_guard])
async def add_replica(request: Request[Any, Any, Any]) -> Response[Any]:
    body = decode_json(await request.body(), AddReplica)
    if not body.url.startswith(("http://", "https://")):
        raise ApiError(400, "url must start with http:// or https://", param="url")
    replica = registry_of(request).add(body.url, exact=not body.foreign)
    return _json({"url": replica.url, "status": replica.status}, 201)


@delete("/admin/replicas", status_code=200, guards=[admin_guard])
async def remove_replica(request: Request[Any, Any, Any], url: str) -> Response[Any]:
    await registry_of(request).remove(url)
    return _json({"url": url.rstrip("/"), "removed": True})


ROUTES = [health, ready, metrics, list_replicas, add_replica, remove_replica]
