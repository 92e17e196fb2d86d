"""The gateway's litestar application: OpenAI API, admin and ops routes, one Registry.

Importing this module must not import torch (tests/gateway/test_gateway_units.py checks):
the gateway runs where no model does.
"""

from __future__ import annotations

from typing import Any

from litestar import Litestar
from litestar.datastructures import State

from gateway import admin_routes, hot_path, openai_api
from gateway.config import GatewayConfig
from gateway.errors import EXCEPTION_HANDLERS
from gateway.metrics import GatewayMetrics
from gateway.registry import Registry
from gateway.replica_http import close_connections


class GatewayApp:
    """The ASGI app uvicorn serves, plus the Registry it starts and stops."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.registry = Registry(config, GatewayMetrics())
        self.litestar = Litestar(
            route_handlers=[*openai_api.ROUTES, *admin_routes.ROUTES],
            on_startup=[self.registry.start],
            on_shutdown=[self.registry.stop, close_connections],
            exception_handlers=EXCEPTION_HANDLERS,
            state=State({"registry": self.registry}),
            openapi_config=None,
            logging_config=None,
            debug=False,
        )

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        # The two completion routes skip Litestar's per-request machinery (gateway/hot_path.py
        # says why and what it costs); everything else, and anything unusual, is Litestar's.
        handler = hot_path.hot_handler(scope)
        if handler is None or not await hot_path.serve(self.litestar, handler, scope, receive, send):
            await self.litestar(scope, receive, send)
