"""The least any Python process in a request's path can add: a TCP pipe, no HTTP at all.

    python -m bench.tcp_pipe --port 9000 --upstream 127.0.0.1:8000

Each client connection gets one upstream connection and the bytes are copied both ways as
they arrive (asyncio protocols on uvloop, TCP_NODELAY on both sides): no parsing, no routing,
no tokenizing. bench/gateway_latency.py puts it in front of the mock as a floor: a router
written in Python that does any work per request adds at least what this adds.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
from collections.abc import Callable
from typing import cast

import uvloop


class _Upstream(asyncio.Protocol):
    def __init__(self, client: asyncio.Transport) -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()


class PipedClient(asyncio.Protocol):
    """A client connection with one upstream connection of its own, opened as it arrives;
    what is sent upstream before that is up waits for it. Subclasses say what talks to the
    upstream (upstream_protocol) and what they send it (send_upstream)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.upstream: asyncio.Transport | None = None
        self.pending: list[bytes] = []

    def upstream_protocol(self) -> asyncio.Protocol:
        raise NotImplementedError

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio subclasses
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        # The transport create_connection returns (uvloop may call connection_made later).
        upstream, _ = await loop.create_connection(self.upstream_protocol, self.host, self.port)
        upstream.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.upstream = cast(asyncio.Transport, upstream)
        for data in self.pending:
            upstream.write(data)
        self.pending.clear()

    def send_upstream(self, data: bytes) -> None:
        if self.upstream is None:
            self.pending.append(data)
        else:
            self.upstream.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.close()


class _Client(PipedClient):
    def upstream_protocol(self) -> asyncio.Protocol:
        return _Upstream(self.transport)

    def data_received(self, data: bytes) -> None:
        self.send_upstream(data)


async def serve(port: int, upstream: str, protocol: Callable[[str, int], asyncio.Protocol]) -> None:
    host, upstream_port = upstream.rsplit(":", 1)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: protocol(host, int(upstream_port)), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main(description: str = __doc__, protocol: Callable[[str, int], asyncio.Protocol] = _Client) -> None:
    """Serve `protocol` (built with the upstream's host and port, one per client connection)
    on --port; bench/http_floor.py runs its own this way."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="host:port")
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.upstream, protocol))


if __name__ == "__main__":
    main()
