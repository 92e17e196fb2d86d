"""The gateway's litestar application: OpenAI API, admin and ops routes, one Registry.

In front of it all, GatewayApp.__call__ answers before any handler: 413 for a body declared
over max_body_bytes, 401 / 403 for a missing or wrong key (gateway/auth.py), 429 beyond
max_in_flight (gateway/admission.py). Admitted completion requests carry their Tenant in
the ASGI scope, from which openai_api sets the cache_salt that routing and replicas use.

Importing this module must not import torch (tests/gateway/test_gateway_units.py checks):
the gateway runs where no model does.
"""

from __future__ import annotations

from typing import Any

from litestar import Litestar
from litestar.datastructures import State

from engine.server.openapi import OPENAI_OPERATIONS, Documented, openapi_config
from gateway import admin_routes, hot_path, openai_api
from gateway.admission import Admission
from gateway.auth import TENANT_SCOPE_KEY, Refusal, Tenant, load_access, route_path
from gateway.config import GatewayConfig
from gateway.errors import EXCEPTION_HANDLERS, ApiError
from gateway.metrics import GatewayMetrics
from gateway.registry import Registry
from gateway.replica_http import close_connections

# The bodies handlers read raw, described for GET /schema/openapi.json (and schemathesis).
_OPERATIONS = {**OPENAI_OPERATIONS, ("/admin/replicas", "post"): Documented(admin_routes.AddReplica)}

_REFUSAL_REASONS = {401: "unauthorized", 403: "forbidden", 413: "body_too_large", 429: "overloaded"}


class GatewayApp:
    """The ASGI app uvicorn serves, plus the Registry it starts and stops."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.metrics = GatewayMetrics()
        self.registry = Registry(config, self.metrics)
        self.access = load_access(config)
        self.admission = Admission(config.max_in_flight, config.retry_after_s)
        self.metrics.watch_admitted(lambda: self.admission.in_flight)
        self._max_body_bytes = config.max_body_bytes
        self._too_large = Refusal(
            ApiError(
                413,
                f"the request body is larger than this gateway's limit of {config.max_body_bytes} bytes",
                code="request_too_large",
            )
        )
        self.litestar = Litestar(
            route_handlers=[*openai_api.ROUTES, *admin_routes.ROUTES],
            on_startup=[self.registry.start],
            on_shutdown=[self.registry.stop, close_connections],
            exception_handlers=EXCEPTION_HANDLERS,
            state=State({"registry": self.registry, "access": self.access}),
            openapi_config=openapi_config("prefixgate gateway", _OPERATIONS),
            logging_config=None,
            debug=False,
            request_max_body_size=config.max_body_bytes,
        )

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.litestar(scope, receive, send)
            return
        # The front: size, key and admission are checked before any body is read or any
        # handler runs, so a refusal costs a dict lookup or two and answers at once.
        headers = hot_path.request_headers(scope)
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self._max_body_bytes:
            await self._refuse(headers, self._too_large, receive, send)
            return
        path = route_path(scope["path"])
        tenant = self.access.check(path, headers.get("authorization"))
        if type(tenant) is Refusal:
            await self._refuse(headers, tenant, receive, send)
            return
        assert isinstance(tenant, Tenant)
        scope[TENANT_SCOPE_KEY] = tenant
        # The two completion routes skip Litestar's per-request machinery (gateway/hot_path.py
        # says why and what it costs); everything else is Litestar's.
        handler = hot_path.hot_handler(scope["method"], path)
        if handler is None:
            await self.litestar(scope, receive, send)
            return
        refusal = self.admission.enter(tenant)
        if refusal is not None:
            await self._refuse(headers, refusal, receive, send)
            return
        try:
            await hot_path.serve(
                self.litestar, handler, scope, headers, receive, send, self._too_large, self._max_body_bytes
            )
        finally:
            self.admission.leave(tenant)

    async def _refuse(self, headers: dict[str, str], refusal: Refusal, receive: Any, send: Any) -> None:
        self.metrics.child(self.metrics.refused, _REFUSAL_REASONS.get(refusal.status, "other")).inc()
        await hot_path.refuse(send, receive, headers, refusal)
