"""Replica management: registration, KV-event following, load refresh, health, circuit breaker.

Each replica gets one supervisor task. For our engines it loops: GET /internal/info (503
until the replica is ready), join the model's pool, then follow GET /kv/events: the first
line is a snapshot that replaces the replica's index, later lines are applied in order. The
replica is healthy exactly while that stream is up. When the stream breaks (the replica
died, drained, or lost events), or the circuit breaker opens after repeated request
failures, the replica is unhealthy until the loop reconnects and loads a fresh snapshot, so
its index is exact again whenever it takes traffic.

A hung replica (SIGSTOP, a wedged host) keeps its sockets open, so only silence tells: the
stream carries a heartbeat when idle, and `liveness_timeout_s` without a line fails every
request in flight there (those not yet streaming are retried on another replica). A sweep
fails any request that has had no byte for `upstream_idle_timeout_s`, whatever the cause.

Foreign backends (no KV events) are polled with GET /v1/models instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import msgspec

from cache.replica_index import ApplyOutcome, ReplicaPrefixIndex
from engine.server.protocol import (
    CacheSnapshot,
    Heartbeat,
    KVStreamMessage,
    LoadReport,
    ReplicaInfo,
    from_wire,
)
from gateway.config import GatewayConfig
from gateway.errors import ApiError
from gateway.metrics import GatewayMetrics
from gateway.pool import HEALTHY, UNHEALTHY, ModelPool, Replica
from gateway.replica_http import connections
from gateway.text import GatewayTokenizer
from policies.routing import routing_policy

log = logging.getLogger("prefixgate.gateway")

_kv_decoder = msgspec.json.Decoder(KVStreamMessage)
_FOREIGN_BLOCK_SIZE = 16


class _StreamBroken(Exception):
    pass


async def ndjson_lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytearray]:
    """The non-empty lines of a stream of chunks, however long a line is. aiohttp's own line
    reader refuses lines over 128 KiB, and a snapshot of a big cache is one line of megabytes
    (54,000 blocks on an H200: ~1 MB), so a gateway started after the cache filled never synced."""
    pending = bytearray()
    async for chunk in chunks:
        end = chunk.rfind(b"\n")
        if end < 0:
            pending += chunk
            continue
        pending += chunk[:end]
        lines = pending.split(b"\n")
        pending = bytearray(chunk[end + 1 :])
        for line in lines:
            if line.strip():
                yield line
    if pending.strip():
        yield pending


class Registry:
    def __init__(self, config: GatewayConfig, metrics: GatewayMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self.session: aiohttp.ClientSession | None = None
        self.pools: dict[str, ModelPool] = {}
        self.replicas: dict[str, Replica] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._streams: dict[str, aiohttp.ClientResponse] = {}
        self._load_task: asyncio.Task[None] | None = None
        self._sweep_task: asyncio.Task[None] | None = None
        self._tokenizers: dict[str, GatewayTokenizer] = {}

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, connect=self.config.connect_timeout_s)
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        self.session = aiohttp.ClientSession(timeout=timeout, connector=connector)
        for url in self.config.replicas:
            self.add(url, exact=True)
        for url in self.config.foreign_replicas:
            self.add(url, exact=False)
        self._load_task = asyncio.create_task(self._refresh_loads())
        self._sweep_task = asyncio.create_task(self._sweep_idle())

    async def stop(self) -> None:
        background = [t for t in (self._load_task, self._sweep_task) if t is not None]
        tasks = [*self._tasks.values(), *background]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.session is not None:
            await self.session.close()

    @property
    def ready(self) -> bool:
        """Every replica had its first try (indexes loaded from snapshots), and one is healthy."""
        replicas = list(self.replicas.values())
        return bool(replicas) and all(r.attempted for r in replicas) and any(r.healthy for r in replicas)

    # ---- replicas --------------------------------------------------------------------

    def add(self, url: str, exact: bool = True) -> Replica:
        url = url.rstrip("/")
        if url in self.replicas:
            raise ApiError(409, f"replica {url} is already registered", code="replica_exists")
        replica = Replica(url=url, exact=exact)
        self.replicas[url] = replica
        supervise = self._supervise_engine if exact else self._supervise_foreign
        self._tasks[url] = asyncio.create_task(supervise(replica))
        return replica

    async def remove(self, url: str) -> None:
        url = url.rstrip("/")
        replica = self.replicas.pop(url, None)
        if replica is None:
            raise ApiError(404, f"no replica {url} is registered", code="replica_not_found")
        task = self._tasks.pop(url)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if replica.model is not None and replica.model in self.pools:
            self.pools[replica.model].leave(replica)
        replica.status = UNHEALTHY
        self.metrics.healthy.labels(url).set(0)

    def pool_for(self, model: str | None) -> ModelPool:
        if model is not None:
            pool = self.pools.get(model)
            if pool is None:
                pool = next((p for p in self.pools.values() if model in p.aliases), None)
            if pool is None and not all(r.attempted for r in self.replicas.values()):
                # Just started (or a replica just added): the model may be on one not joined yet.
                raise ApiError(
                    503, "the gateway is still connecting to its replicas", headers={"Retry-After": "1"}
                )
            if pool is None:
                served = ", ".join(sorted(self.pools)) or "none yet"
                raise ApiError(
                    404,
                    f"the model {model!r} does not exist; served: {served}",
                    param="model",
                    code="model_not_found",
                )
            return pool
        if len(self.pools) == 1:
            return next(iter(self.pools.values()))
        if not self.pools:
            raise ApiError(503, "no replica is ready yet", headers={"Retry-After": "1"})
        raise ApiError(400, "several models are served: name one in `model`", param="model")

    # ---- circuit breaker -------------------------------------------------------------

    def record_success(self, replica: Replica) -> None:
        replica.failures = 0

    def record_failure(self, replica: Replica, reason: str) -> None:
        replica.failures += 1
        replica.last_error = reason
        if replica.failures >= self.config.failure_threshold and replica.healthy:
            log.warning(
                "replica %s: circuit open after %d failures (%s)", replica.url, replica.failures, reason
            )
            self._set_status(replica, UNHEALTHY)
            stream = self._streams.get(replica.url)
            if stream is not None:
                stream.close()  # the supervisor reconnects, probes, and resyncs from a snapshot

    def _set_status(self, replica: Replica, status: str) -> None:
        if replica.status != status:
            log.info("replica %s: %s -> %s", replica.url, replica.status, status)
        replica.status = status
        self.metrics.healthy.labels(replica.url).set(1 if status == HEALTHY else 0)

    # ---- our engines: info + /kv/events ---------------------------------------------

    async def _supervise_engine(self, replica: Replica) -> None:
        delay = 0.1
        while True:
            synced = replica.resyncs
            try:
                info = await self._get(replica.url + "/internal/info", ReplicaInfo)
                pool = await self._join(replica, info)
                await self._follow(replica, pool)
                replica.last_error = "the /kv/events stream ended"
            except asyncio.CancelledError:
                raise
            except TimeoutError:
                replica.last_error = "the replica stopped answering: hung"
                self._set_status(replica, UNHEALTHY)
                if failed := connections().abort(replica.url, "the replica stopped responding"):
                    log.warning("replica %s hung: %d requests failed over", replica.url, failed)
            except Exception as err:
                replica.last_error = f"{type(err).__name__}: {err}"
            if replica.healthy:
                log.warning("replica %s unhealthy: %s", replica.url, replica.last_error)
            self._set_status(replica, UNHEALTHY)
            replica.attempted = True
            if replica.resyncs != synced:
                delay = 0.1  # it was up: try again soon, then back off
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.config.reconnect_max_s)

    async def _follow(self, replica: Replica, pool: ModelPool) -> None:
        assert self.session is not None
        index = pool.index.exact_index(replica.url)
        timeout = aiohttp.ClientTimeout(
            total=None, connect=self.config.connect_timeout_s, sock_read=self.config.liveness_timeout_s
        )
        async with self.session.get(replica.url + "/kv/events", timeout=timeout) as response:
            if response.status != 200:
                raise _StreamBroken(f"/kv/events answered {response.status}")
            self._streams[replica.url] = response
            try:
                async for line in ndjson_lines(response.content.iter_any()):
                    self._apply(replica, index, _kv_decoder.decode(line))
            finally:
                self._streams.pop(replica.url, None)

    def _apply(self, replica: Replica, index: ReplicaPrefixIndex, message: KVStreamMessage) -> None:
        if isinstance(message, CacheSnapshot):
            index.load_snapshot(message.block_hashes, message.seq)
            replica.resyncs += 1
            replica.failures = 0
            replica.last_error = None
            replica.attempted = True
            self._set_status(replica, HEALTHY)
        elif isinstance(message, Heartbeat):
            if index.note_heartbeat(message.seq):
                raise _StreamBroken("events were lost: resync")
        elif index.apply(*from_wire(message)) is ApplyOutcome.GAP:
            raise _StreamBroken("gap in KV event sequence numbers: resync")
        self.metrics.index_blocks.labels(replica.url).set(len(index))

    async def _join(self, replica: Replica, info: ReplicaInfo) -> ModelPool:
        pool = self.pools.get(info.model)
        if pool is None:
            tokenizer = await self._tokenizer(info)
            pool = self.pools.get(info.model)  # another replica may have created it meanwhile
            if pool is None:
                pool = ModelPool(
                    info.model,
                    info,
                    tokenizer,
                    routing_policy(self.config.policy),
                    ttl_s=self.config.approximate_ttl_s,
                    approximate_max_blocks=self.config.approximate_max_blocks,
                    max_sessions=self.config.max_sessions,
                )
                self.pools[info.model] = pool
        problem = pool.compatible(info)
        if problem is not None:
            raise _StreamBroken(problem)
        replica.info = info
        replica.model = info.model
        pool.join(replica)
        return pool

    async def _tokenizer(self, info: ReplicaInfo) -> GatewayTokenizer:
        candidates = [info.model_folder, *([self.config.tokenizer] if self.config.tokenizer else [])]
        for folder in candidates:
            if folder in self._tokenizers:
                return self._tokenizers[folder]
            if folder and (Path(folder) / "tokenizer.json").is_file():
                tokenizer = await asyncio.to_thread(GatewayTokenizer, folder)
                self._tokenizers[folder] = tokenizer
                return tokenizer
        raise _StreamBroken(f"no tokenizer for model {info.model!r}: pass --tokenizer FOLDER")

    async def _get(self, url: str, into: type[msgspec.Struct]) -> msgspec.Struct:
        assert self.session is not None
        timeout = aiohttp.ClientTimeout(total=self.config.connect_timeout_s)
        async with self.session.get(url, timeout=timeout) as response:
            body = await response.read()
            if response.status != 200:
                raise _StreamBroken(f"GET {url} answered {response.status}")
            return msgspec.json.decode(body, type=into)

    async def _sweep_idle(self) -> None:
        deadline = self.config.upstream_idle_timeout_s
        while True:
            await asyncio.sleep(min(1.0, deadline / 4))
            failed = connections().sweep(deadline)
            if failed:
                log.warning("%d requests had no answer from their replica for %g s: failed", failed, deadline)

    # ---- load -----------------------------------------------------------------------

    async def _refresh_loads(self) -> None:
        while True:
            await asyncio.sleep(self.config.load_interval_s)
            replicas = [r for r in self.replicas.values() if r.exact and r.healthy]
            await asyncio.gather(*(self._refresh_load(r) for r in replicas), return_exceptions=True)

    async def _refresh_load(self, replica: Replica) -> None:
        # The /kv/events stream is the liveness signal; a missed /load only ages the load.
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, _StreamBroken, msgspec.DecodeError):
            replica.load = await self._get(replica.url + "/load", LoadReport)  # type: ignore[assignment]

    # ---- foreign backends -----------------------------------------------------------

    async def _supervise_foreign(self, replica: Replica) -> None:
        assert self.session is not None
        while True:
            try:
                timeout = aiohttp.ClientTimeout(total=self.config.connect_timeout_s)
                async with self.session.get(replica.url + "/v1/models", timeout=timeout) as response:
                    body = await response.json() if response.status == 200 else None
                if body is None:
                    raise _StreamBroken(f"/v1/models answered {response.status}")
                model = self.config.foreign_model or body["data"][0]["id"]
                if replica.model is None:
                    await self._join_foreign(replica, model)
                if replica.status != HEALTHY and replica.failures < self.config.failure_threshold:
                    self._set_status(replica, HEALTHY)
                elif replica.status != HEALTHY:
                    replica.failures = 0  # probed healthy: close the breaker on the next probe
            except asyncio.CancelledError:
                raise
            except Exception as err:
                replica.last_error = f"{type(err).__name__}: {err}"
                self._set_status(replica, UNHEALTHY)
            replica.attempted = True
            await asyncio.sleep(self.config.health_interval_s)

    async def _join_foreign(self, replica: Replica, model: str) -> None:
        pool = self.pools.get(model)
        if pool is None:
            if not self.config.tokenizer:
                raise _StreamBroken("a foreign backend needs --tokenizer FOLDER")
            folder = self.config.tokenizer
            info = ReplicaInfo(
                model=model,
                aliases=[],
                model_id=model,
                block_size=_FOREIGN_BLOCK_SIZE,
                max_model_len=1 << 20,
                vocab_size=1 << 31,
                default_max_tokens=256,
                model_folder=folder,
            )
            await self._join(replica, info)
        else:
            replica.info, replica.model = pool.info, model
            pool.join(replica)
