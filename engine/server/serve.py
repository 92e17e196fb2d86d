"""Run one replica: uvicorn serving ReplicaApp, with a graceful drain on SIGTERM / SIGINT.

On the first signal the replica stops taking requests (503, /health goes 503), ends its
/kv/events streams, and uvicorn waits up to drain_timeout_s for running requests to finish
before the core process is shut down.
"""

from __future__ import annotations

import gc
import logging
from types import FrameType

import uvicorn

from engine.server.app import ReplicaApp
from engine.server.config import ServerConfig
from traces import configure_tracing, shutdown_tracing


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: ReplicaApp) -> None:
        super().__init__(config)
        self._replica_app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._replica_app.begin_drain_threadsafe()
        super().handle_exit(sig, frame)


def run(config: ServerConfig) -> None:
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s [api] %(name)s: %(message)s"
    )
    configure_tracing("prefixgate-engine")
    app = ReplicaApp(config)
    uvicorn_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=config.drain_timeout_s,
        # As on the gateway (gateway/serve.py): uvicorn's 5 s default closes idle connections
        # that clients then reuse; the 10,000-request soak saw one direct request reset so.
        timeout_keep_alive=65,
    )
    # As in gateway/serve.py: the startup heap frozen, so a full collection does not stall the
    # API process (the engine core, a process of its own, freezes its heap after its warm-up).
    gc.collect()
    gc.freeze()
    try:
        _DrainingServer(uvicorn_config, app).run()
    finally:
        shutdown_tracing()
