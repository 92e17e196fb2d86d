"""Run the gateway (`prefixgate gateway`), or the gateway plus local replicas (`prefixgate serve`).

`serve` starts N replica processes (`python -m prefixgate.cli engine`, one per listed GPU with
CUDA_VISIBLE_DEVICES set, or N on the CPU), runs the gateway in this process, prints where to
point a client, and on Ctrl-C / SIGTERM stops the gateway, then every replica.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.app import GatewayApp
from gateway.auth import load_access
from gateway.config import GatewayConfig
from traces import configure_tracing, shutdown_tracing

log = logging.getLogger("prefixgate.gateway")


class _CoalescingTransport:
    """Joins the writes one turn of the event loop makes into one send.

    uvicorn writes a response's status line and headers, then each body part, as separate
    sends: two packets (and two wake-ups of the client) for every JSON answer, and one per SSE
    chunk even when several chunks are ready at once. Held writes go out at the end of the
    current loop turn, so nothing waits for more data: only what is ready together is joined;
    a response's last write goes out at once (_HttpProtocol.on_response_complete).
    """

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._held: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        if not self._held:
            self._loop.call_soon(self.flush)
        self._held.append(data)

    def flush(self) -> None:
        if self._held:
            data = b"".join(self._held)
            self._held.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _HttpProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_CoalescingTransport(transport))  # type: ignore[arg-type]

    def on_response_complete(self) -> None:
        # The answer is whole: out now, not after the handler's task has unwound (the end of
        # this loop turn), which put ~10 us of clean-up in front of every JSON answer.
        self.transport.flush()  # type: ignore[attr-defined]
        super().on_response_complete()


def run_gateway(config: GatewayConfig, banner: str | None = None) -> None:
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s [gateway] %(name)s: %(message)s"
    )
    configure_tracing("prefixgate-gateway")
    app = GatewayApp(config)
    # uvloop and httptools (dependencies) roughly halve uvicorn's own cost per request against
    # asyncio + h11; "auto" would pick them too, but silently fall back when they are missing.
    # The protocol is uvicorn's httptools one, with its writes joined (_CoalescingTransport).
    # proxy_headers off: nothing here reads the client's address, so uvicorn's middleware that
    # rewrites it from X-Forwarded-For would only add a layer to every request.
    server_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        access_log=False,
        lifespan="on",
        loop="uvloop",
        http=_HttpProtocol,
        proxy_headers=False,
        # Clients pool connections and reuse them after idle gaps (an agent waiting on a tool).
        # A server closing an idle connection races a request sent on it: the client sees
        # "server disconnected" (once in 641 agent requests at uvicorn's default of 5 s).
        # Outlasting common client and load-balancer idle limits (60 s) makes the race rare.
        timeout_keep_alive=65,
    )
    if banner:
        print(banner, file=sys.stderr, flush=True)
    # Startup's heap out of the cyclic collector's sight (as vLLM's engine does): a full
    # collection walks every tracked object, ~70k once the gateway's modules are imported
    # (35 ms on this project's busy 2-core machine; the tokenizer adds more), and stalls
    # every request in flight; frozen, it walks only what serving allocates.
    gc.collect()
    gc.freeze()
    try:
        uvicorn.Server(server_config).run()
    finally:
        shutdown_tracing()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2.0) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def start_replicas(
    count: int, gpus: Sequence[str], engine_args: Sequence[str], host: str = "127.0.0.1"
) -> list[tuple[subprocess.Popen[bytes], str]]:
    """Start the replica processes; return (process, url) pairs without waiting for them."""
    slots: list[str | None] = list(gpus) if gpus else [None] * count
    started = []
    for gpu in slots:
        port = free_port(host)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        args = [sys.executable, "-m", "prefixgate.cli", "engine", "--host", host, "--port", str(port)]
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
            args += ["--device", "cuda"]
        else:
            args += ["--device", "cpu"]
        process = subprocess.Popen([*args, *engine_args], env=env)
        started.append((process, f"http://{host}:{port}"))
    return started


def stop_replicas(replicas: Sequence[tuple[subprocess.Popen[bytes], str]], timeout: float = 30.0) -> None:
    for process, _ in replicas:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process, _ in replicas:
        try:
            process.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def serve(
    config: GatewayConfig, count: int, gpus: Sequence[str], engine_args: Sequence[str], wait_s: float = 600.0
) -> int:
    replicas = start_replicas(count, gpus, engine_args, config.host)
    try:
        deadline = time.monotonic() + wait_s
        pending = {url for _, url in replicas}
        while pending:
            for process, url in replicas:
                if process.poll() is not None:
                    print(f"prefixgate: replica {url} exited with {process.returncode}", file=sys.stderr)
                    return 1
            pending = {url for url in pending if not _ready(url)}
            if time.monotonic() > deadline:
                print(
                    f"prefixgate: replicas not ready after {wait_s:.0f} s: {sorted(pending)}", file=sys.stderr
                )
                return 1
            time.sleep(0.2)
        config = replace(config, replicas=(*config.replicas, *(url for _, url in replicas)))
        where = f"http://{config.host}:{config.port}"
        key_note = "a configured api_key" if load_access(config).keys_required else "any api_key"
        banner = (
            f"prefixgate: {len(replicas)} replicas ready; gateway on {where}\n"
            f"prefixgate: point an OpenAI client at base_url={where}/v1 ({key_note}); Ctrl-C stops all"
        )
        run_gateway(config, banner)
    except KeyboardInterrupt:
        pass
    finally:
        stop_replicas(replicas)
    return 0
