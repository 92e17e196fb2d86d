"""The litestar application of one replica, and the core process it starts and stops."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from litestar import Litestar
from litestar.datastructures import State

from engine.model_store import resolve_model
from engine.server import gateway_routes, openai_routes, ops_routes
from engine.server.config import ServerConfig
from engine.server.core_client import CoreClient
from engine.server.errors import EXCEPTION_HANDLERS
from engine.server.metrics import HttpMetricsMiddleware, ServerMetrics
from engine.server.openapi import REPLICA_OPERATIONS, openapi_config
from engine.server.replica import Replica
from engine.server.tokenizer import TextTools, load_tokenizer

_ROUTES = [*openai_routes.ROUTES, *gateway_routes.ROUTES, *ops_routes.ROUTES]


class ReplicaApp:
    """The ASGI app uvicorn serves: litestar behind an HTTP-metrics wrapper, plus its Replica."""

    def __init__(self, config: ServerConfig, model_folder: Path | None = None) -> None:
        folder = model_folder or resolve_model(config.engine.model)
        metrics = ServerMetrics()
        self.replica = Replica(
            config=config,
            client=CoreClient(config, str(folder), metrics),
            text=TextTools(load_tokenizer(folder)),
            metrics=metrics,
            model_folder=str(folder),
        )
        self.loop: asyncio.AbstractEventLoop | None = None
        litestar = Litestar(
            route_handlers=_ROUTES,
            on_startup=[self._start],
            on_shutdown=[self._stop],
            exception_handlers=EXCEPTION_HANDLERS,
            state=State({"replica": self.replica}),
            openapi_config=openapi_config("prefixgate replica", REPLICA_OPERATIONS),
            logging_config=None,  # serve.run configures logging; litestar must not reconfigure it
            debug=False,
        )
        paths = frozenset(route.path for route in litestar.routes)
        self._asgi = HttpMetricsMiddleware(litestar, metrics, paths)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self._asgi(scope, receive, send)

    async def _start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.replica.client.start()

    async def _stop(self) -> None:
        await self.replica.client.stop()

    def begin_drain_threadsafe(self) -> None:
        """Called from the SIGTERM handler: hand the work to the event loop."""
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.replica.begin_drain)
