"""What every route handler of one replica shares: config, the core client, the tokenizer."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import msgspec
from litestar import Request, Response

from engine.model_store import DEFAULT_MODEL, is_default_model
from engine.server import ipc
from engine.server.config import ServerConfig
from engine.server.core_client import CoreClient
from engine.server.errors import ApiError
from engine.server.metrics import ServerMetrics
from engine.server.openai_inputs import Limits, check_model
from engine.server.tokenizer import TextTools

_json = msgspec.json.Encoder()


@dataclass(slots=True)
class Replica:
    config: ServerConfig
    client: CoreClient
    text: TextTools
    metrics: ServerMetrics
    model_folder: str

    @property
    def ready(self) -> ipc.Ready:
        return self.client.check_available()

    @property
    def model_name(self) -> str:
        ready = self.ready
        return self.config.served_model_name or ready.model_id

    def aliases(self) -> frozenset[str]:
        """Other names a client may use for the served model."""
        names = {self.ready.model_id, self.config.engine.model, self.model_folder}
        if is_default_model(self.config.engine.model):
            names |= {"default", DEFAULT_MODEL, f"HuggingFaceTB/{DEFAULT_MODEL}"}
        return frozenset(names)

    def check_model(self, requested: str | None) -> None:
        check_model(requested, self.model_name, self.aliases())

    @property
    def limits(self) -> Limits:
        ready = self.ready
        return Limits(ready.max_model_len, ready.vocab_size, self.config.default_max_tokens)

    def begin_drain(self) -> None:
        """SIGTERM: refuse new work, end /kv/events streams, let running requests finish."""
        self.client.begin_drain()


def replica_of(request: Request[Any, Any, Any]) -> Replica:
    return request.app.state.replica  # type: ignore[no-any-return]


def json_response(body: Any, status_code: int = 200) -> Response[bytes]:
    return Response(_json.encode(body), status_code=status_code, media_type="application/json")


async def wait_for_disconnect(request: Request[Any, Any, Any]) -> None:
    """Returns when the client closes its connection (the body must have been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request[Any, Any, Any], work: Any) -> None:
    """Await `work`; if the client goes away first, cancel it and answer nobody (499)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()
            return
        raise ApiError(499, "the client closed the connection")
    finally:
        task.cancel()
        watcher.cancel()
