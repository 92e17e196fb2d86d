"""The soak's processes (bench/soak.py): real replicas and a gateway on 127.0.0.1, their
process tree, resident memory, and the state each exposes over HTTP.

RSS is read from /proc/<pid>/status (VmRSS), so no extra dependency; the engine core is the
replica's multiprocessing "spawn" child (its command line runs spawn_main).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from engine.server.protocol import BlockRemoved, BlockStored, CacheSnapshot, KVStreamMessage, apply_kv_message
from gateway.registry import ndjson_lines

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    name: str
    args: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> Server:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with self.log.open("ab") as out:
            command = [sys.executable, "-m", "prefixgate.cli", *self.args, "--port", str(self.port)]
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    async def wait_ready(self, session: aiohttp.ClientSession, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited:\n{self.log_tail()}")
            try:
                async with session.get(self.url + "/health", timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready after {timeout_s} s:\n{self.log_tail()}")
            await asyncio.sleep(0.2)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


# --- /proc ----------------------------------------------------------------------------


def rss_kib(pid: int) -> int | None:
    """Resident set size in KiB, or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def engine_core_pid(replica_pid: int) -> int | None:
    """The replica's engine core: the child started by multiprocessing's spawn context."""
    for child in _children(replica_pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as cmdline:
                if b"spawn_main" in cmdline.read():
                    return child
        except FileNotFoundError:
            continue
    return None


# --- HTTP state -----------------------------------------------------------------------


async def get_json(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url) as response:
        body = await response.read()
        try:
            return response.status, json.loads(body)
        except ValueError:
            return response.status, body.decode(errors="replace")


_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


async def metric_series(session: aiohttp.ClientSession, url: str, *names: str) -> dict[str, float]:
    """Samples of the named metrics from a /metrics page, keyed by name{labels}."""
    async with session.get(url + "/metrics") as response:
        text = await response.text()
    out = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and match["name"] in names:
            out[f"{match['name']}{{{match['labels'] or ''}}}"] = float(match["value"])
    return out


class KVMirror:
    """A copy of one replica's cached block hashes built from its /kv/events stream, plus
    counts of the blocks it stored and removed (removals are evictions)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.hashes: set[int] = set()
        self.last_seq = -1
        self.stored = 0
        self.removed = 0
        self.snapshots = 0
        self.breaks: list[str] = []  # why the stream broke, each time it did
        self.changed = asyncio.Event()
        self._decoder = msgspec.json.Decoder(KVStreamMessage)  # type: ignore[var-annotated]

    async def follow(self, session: aiohttp.ClientSession) -> None:
        """Follow the stream; when it ends or breaks, reconnect and start from a new snapshot,
        as the gateway does (each reconnect is counted, and why it broke is kept)."""
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        while True:
            try:
                async with session.get(self.url + "/kv/events", timeout=timeout) as response:
                    response.raise_for_status()
                    async for line in ndjson_lines(response.content.iter_any()):
                        self._apply(self._decoder.decode(line))
                self.breaks.append("the stream ended")
            except (aiohttp.ClientError, msgspec.DecodeError, ValueError) as err:
                self.breaks.append(f"{type(err).__name__}: {err}"[:200])
            await asyncio.sleep(0.2)

    def _apply(self, message: KVStreamMessage) -> None:
        apply_kv_message(self.hashes, message)
        if isinstance(message, BlockStored):
            self.stored += len(message.block_hashes)
        elif isinstance(message, BlockRemoved):
            self.removed += len(message.block_hashes)
        elif isinstance(message, CacheSnapshot):
            self.snapshots += 1
        self.last_seq = message.seq
        self.changed.set()

    async def wait_for(self, seq: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.last_seq < seq:
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                return self.last_seq >= seq
        return True
