"""The API process's handle on the engine core process.

Two threads do the blocking pipe work so the event loop never waits on the core: a writer
sends queued messages, a reader receives each core message and hands it to the event loop,
which routes deltas to per-HTTP-request queues and KV events to /kv/events subscribers.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import queue
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

from engine.server import ipc
from engine.server.config import ServerConfig
from engine.server.core_process import CoreProcessConfig, run_core_process
from engine.server.errors import ApiError
from engine.server.metrics import ServerMetrics
from engine.server.protocol import KVEvent, LoadSnapshot
from traces.spans import EngineSpan

log = logging.getLogger("prefixgate.engine.server")


class Submission:
    """The engine requests behind one HTTP request (n samples, or a batch of prompts).

    Their deltas arrive on one queue in step order. `close()` aborts whatever has not
    finished: handlers call it in a `finally`, so a client that goes away frees its blocks.
    """

    def __init__(self, client: CoreClient, request_ids: list[str], span: EngineSpan | None = None) -> None:
        self.request_ids = request_ids
        self.pending = set(request_ids)
        self.queue: asyncio.Queue[ipc.Delta | ApiError] = asyncio.Queue()
        self._client = client
        self._span = span
        self._finish_reasons: dict[str, str | None] = {}

    @property
    def done(self) -> bool:
        return not self.pending

    async def next(self) -> ipc.Delta:
        """The next delta of any of the requests; raises ApiError if the engine failed one."""
        item = await self.queue.get()
        if isinstance(item, ApiError):
            if self._span is not None:
                self._span.end(error=item.message)
            raise item
        if self._span is not None:
            self._span.step(
                new_tokens=len(item.token_ids),
                prompt_tokens=item.num_prompt_tokens,
                cached_tokens=item.num_cached_tokens,
                queue_time_s=item.queue_time,
                prefill_chunks=item.prefill_chunks,
            )
        if item.finish_reason is not None:
            self.pending.discard(item.request_id)
            self._finish_reasons[item.request_id] = item.finish_reason
        return item

    def close(self) -> None:
        aborted = bool(self.pending)
        if self.pending:
            self._client.abort(sorted(self.pending))
            self.pending.clear()
        if self._span is not None:
            reasons = [self._finish_reasons.get(r) for r in self.request_ids]
            self._span.finish(reasons, error="aborted before it finished" if aborted else None)

    def __del__(self) -> None:
        # A response stream that was dropped before it started never runs its `finally`.
        self.close()


class KVSubscription:
    """Event batches for one /kv/events stream; None marks its end."""

    def __init__(self, maxsize: int) -> None:
        self.queue: asyncio.Queue[list[KVEvent] | None] = asyncio.Queue(maxsize)
        self.overflowed = False

    def offer(self, item: list[KVEvent] | None) -> None:
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            # Never block the dispatcher on a slow reader: cut it off; it resnapshots.
            self.overflowed = True


@dataclass(slots=True)
class _Tracked:
    # Weak, so that an HTTP request whose handler is gone can still be garbage collected
    # (and its Submission's __del__ aborts the engine requests).
    submission: weakref.ref[Submission]
    arrival: float
    prompt_tokens: int
    first_token: float | None = None
    last_token: float | None = None
    num_tokens: int = 0


class CoreClient:
    def __init__(self, config: ServerConfig, model_folder: str, metrics: ServerMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self.ready: ipc.Ready | None = None
        self.failure: str | None = None  # why the core is not (or no longer) usable
        self.draining = False
        self.load: LoadSnapshot | None = None
        self._core_config = CoreProcessConfig(config.engine, model_folder, config.log_level, config.step_log)
        self._inflight: dict[str, _Tracked] = {}
        # Weak: a stream dropped before it ever ran (client gone at once) must not stay subscribed.
        self._subscribers: weakref.WeakSet[KVSubscription] = weakref.WeakSet()
        self._replies: dict[int, asyncio.Future[Any]] = {}
        self._tokens = itertools.count(1)
        self._outgoing: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._process: Any = None
        # When the core last showed progress: a step's output, or work arriving while idle.
        self._progress_at = time.monotonic()
        self._alive: Any = None  # the core's own liveness stamp (shared memory)

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        context = multiprocessing.get_context("spawn")
        core_inbox, to_core = context.Pipe(duplex=False)
        from_core, core_outbox = context.Pipe(duplex=False)
        self._alive = context.Value("d", time.monotonic(), lock=False)
        self._process = context.Process(
            target=run_core_process,
            args=(self._core_config, core_inbox, core_outbox, self._alive),
            name="prefixgate-core",
            daemon=True,
        )
        self._process.start()
        core_inbox.close()
        core_outbox.close()
        threading.Thread(target=self._write, args=(to_core,), name="core-writer", daemon=True).start()
        threading.Thread(target=self._read, args=(from_core,), name="core-reader", daemon=True).start()

    async def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self.draining = True
        self._send(ipc.Shutdown())
        self._outgoing.put(None)
        process = self._process
        if process is None:
            return
        await asyncio.to_thread(process.join, timeout)
        if process.is_alive():
            log.warning("engine core did not stop in %.0f s; terminating it", timeout)
            process.terminate()
            await asyncio.to_thread(process.join, 5.0)

    @property
    def is_ready(self) -> bool:
        return self.ready is not None and self.failure is None

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    @property
    def stalled(self) -> bool:
        """The core holds work and hangs: its process gave no sign of life for `core_stall_s`
        (stopped, starved), or it finished no step for `core_progress_timeout_s` (a wedged GPU
        call; one CPU step may take seconds, so this bound is long). /health and the /kv/events
        heartbeats then go quiet, so a gateway fails this replica's requests over."""
        if not self._inflight:
            return False
        now = time.monotonic()
        if self._alive is not None and now - self._alive.value > self.config.core_stall_s:
            return True
        return now - self._progress_at > self.config.core_progress_timeout_s

    def begin_drain(self) -> None:
        self.draining = True
        for subscription in list(self._subscribers):
            subscription.offer(None)

    def check_available(self) -> ipc.Ready:
        if self.failure is not None:
            raise ApiError(503, f"the engine is not available: {self.failure}")
        if self.draining:
            raise ApiError(503, "the replica is shutting down")
        if self.ready is None:
            raise ApiError(503, "the model is still loading; retry when /health answers 200")
        return self.ready

    # -- requests ----------------------------------------------------------------------
    def submit(self, requests: list[ipc.NewRequest], span: EngineSpan | None = None) -> Submission:
        """Send the requests to the core. A rejection (ApiError) ends `span` with the error."""
        try:
            submission = self._submit(requests, span)
        except ApiError as err:
            if span is not None:
                span.end(error=err.message)
            raise
        return submission

    def _submit(self, requests: list[ipc.NewRequest], span: EngineSpan | None) -> Submission:
        self.check_available()
        limit = self.config.max_in_flight
        if any(r.request_id in self._inflight for r in requests):
            raise ApiError(400, "request_id is already in use by a request in flight", param="request_id")
        if len(requests) > limit:
            raise ApiError(400, f"this asks for {len(requests)} sequences; a replica holds at most {limit}")
        if len(self._inflight) + len(requests) > limit:
            self.metrics.rejected.labels("queue_full").inc()
            raise ApiError(
                429,
                f"the replica's queue is full ({len(self._inflight)} sequences in flight); retry later",
                code="queue_full",
                headers={"Retry-After": str(self.config.retry_after_s)},
            )
        if not self._inflight:
            self._progress_at = time.monotonic()  # an idle core owes no step until now
        submission = Submission(self, [r.request_id for r in requests], span)
        now = time.perf_counter()
        for request in requests:
            self._inflight[request.request_id] = _Tracked(
                weakref.ref(submission), now, len(request.prompt_token_ids)
            )
        self._send(ipc.AddRequests(requests))
        return submission

    def abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            if self._inflight.pop(request_id, None) is not None:
                self.metrics.finished.labels("abort").inc()
        if request_ids and self.failure is None:
            self._send(ipc.AbortRequests(request_ids))

    # -- cache state -------------------------------------------------------------------
    def subscribe(self) -> KVSubscription:
        subscription = KVSubscription(self.config.kv_subscriber_buffer)
        self._subscribers.add(subscription)
        return subscription

    def unsubscribe(self, subscription: KVSubscription) -> None:
        self._subscribers.discard(subscription)

    async def cache_snapshot(self) -> ipc.CacheSnapshotReply:
        return await self._ask(lambda token: ipc.SnapshotCache(token))

    async def inspect(self) -> ipc.StateReply:
        return await self._ask(lambda token: ipc.InspectState(token))

    async def _ask(self, make: Any) -> Any:
        if self.failure is not None or self.ready is None:
            self.check_available()
        token = next(self._tokens)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._replies[token] = future
        self._send(make(token))
        try:
            return await future
        finally:
            self._replies.pop(token, None)

    # -- pipe threads ------------------------------------------------------------------
    def _send(self, message: ipc.ToCore) -> None:
        self._outgoing.put(ipc.encode(message))

    def _write(self, connection: Any) -> None:
        while (data := self._outgoing.get()) is not None:
            try:
                connection.send_bytes(data)
            except OSError:
                return  # the core is gone; the reader reports it
        connection.close()

    def _read(self, connection: Any) -> None:
        loop = self._loop
        assert loop is not None
        try:
            while True:
                try:
                    message = ipc.decode_from_core(connection.recv_bytes())
                except (EOFError, OSError):
                    loop.call_soon_threadsafe(self._on_core_exit)
                    return
                loop.call_soon_threadsafe(self._on_message, message)
        except RuntimeError:
            return  # the event loop closed first: the server is exiting

    # -- dispatch (event loop thread) --------------------------------------------------
    def _on_message(self, message: ipc.FromCore) -> None:
        if isinstance(message, ipc.StepOutput):
            self._progress_at = time.monotonic()
            self._on_step(message)
        elif isinstance(message, ipc.Rejected):
            tracked = self._inflight.pop(message.request_id, None)
            if tracked is not None:
                self._deliver(tracked, ApiError(400, message.message))
        elif isinstance(message, ipc.CacheSnapshotReply | ipc.StateReply):
            future = self._replies.get(message.token)
            if future is not None and not future.done():
                future.set_result(message)
        elif isinstance(message, ipc.Ready):
            self.ready = message
            log.info("engine core ready in %.1f s: %s", message.load_seconds, message.description)
        elif isinstance(message, ipc.StartFailed):
            self.failure = f"the engine failed to start ({message.message})"
            log.error("%s", self.failure)

    def _on_step(self, output: ipc.StepOutput) -> None:
        now = time.perf_counter()
        self.load = output.load
        self.metrics.observe_load(output.load, output.step_seconds)
        if output.events:
            for subscription in self._subscribers:
                subscription.offer(output.events)
        metrics = self.metrics
        for delta in output.deltas:
            tracked = self._inflight.get(delta.request_id)
            if tracked is None:
                continue  # aborted by its client; the core learns of it before its next step
            if delta.queue_time is not None:
                metrics.queue_time.observe(delta.queue_time)
            if delta.token_ids:
                if tracked.first_token is None:
                    tracked.first_token = now
                    metrics.ttft.observe(now - tracked.arrival)
                elif tracked.last_token is not None:
                    metrics.itl.observe(now - tracked.last_token)
                tracked.last_token = now
                tracked.num_tokens += len(delta.token_ids)
                metrics.generation_tokens.inc(len(delta.token_ids))
            if delta.finish_reason == "abort":
                del self._inflight[delta.request_id]
                metrics.finished.labels("error").inc()
                self._deliver(tracked, ApiError(500, "the engine failed while generating"))
                continue
            self._deliver(tracked, delta)
            if delta.finish_reason is not None:
                del self._inflight[delta.request_id]
                metrics.observe_finished(
                    delta.finish_reason,
                    tracked.prompt_tokens,
                    tracked.arrival,
                    tracked.first_token,
                    tracked.last_token,
                    tracked.num_tokens,
                    now,
                )

    def _deliver(self, tracked: _Tracked, item: ipc.Delta | ApiError) -> None:
        submission = tracked.submission()
        if submission is not None:
            submission.queue.put_nowait(item)

    def _on_core_exit(self) -> None:
        if self._stopping:
            return
        self.failure = self.failure or "the engine core process exited"
        log.error("%s", self.failure)
        error = ApiError(503, self.failure)
        for tracked in self._inflight.values():
            self._deliver(tracked, error)
        self._inflight.clear()
        for subscription in self._subscribers:
            subscription.offer(None)
        for future in self._replies.values():
            if not future.done():
                future.set_exception(error)
