"""One client request forwarded to a replica: routing, retries, load accounting, detokenizing.

`ProxiedGeneration.start` routes the request and waits for the replica's first frame; a
replica that fails before that is marked (circuit breaker) and the request goes to another
one, so the client never sees that failure. After the first frame the replica is fixed: a
failure then ends the response with an OpenAI-style error.

Load accounting: a replica's in_flight count goes up when the request is sent and down
exactly once when it ends (finished, failed, client gone); its prefill_queued holds the
prompt tokens the request must still prefill there until its first frame arrives.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from engine.detokenizer import IncrementalDetokenizer
from engine.server.protocol import GenerateFrame, GenerateRequest, TokenLogprob
from gateway.errors import ApiError
from gateway.foreign import ForeignStream, TextFrame, open_foreign
from gateway.pool import ModelPool, Replica, Route
from gateway.registry import Registry
from gateway.upstream import GenerateStream, Retryable, UpstreamBroken, open_generate
from policies.routing import NoReplicaAvailable
from traces.spans import GatewaySpan

log = logging.getLogger("prefixgate.gateway")


@dataclass(slots=True)
class Sample:
    detokenizer: IncrementalDetokenizer | None = None  # made while the replica works on the request
    text: list[str] = field(default_factory=list)
    num_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


class Delta(NamedTuple):  # a tuple: built once per frame, ~5x cheaper than a frozen dataclass
    index: int
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str | None


_NO_DELTAS: tuple[Delta, ...] = ()


class ProxiedGeneration:
    def __init__(
        self,
        registry: Registry,
        pool: ModelPool,
        token_ids: list[int],
        request: GenerateRequest,
        stop: Sequence[str],
        session_id: str | None,
        span: GatewaySpan | None = None,
    ) -> None:
        self.registry = registry
        self.pool = pool
        self.token_ids = token_ids
        self.request = request
        self.stop = list(stop)
        self.session_id = session_id
        self.span = span
        self.samples = [Sample() for _ in range(request.n)]
        self.arrived = time.perf_counter()
        self.replica: Replica | None = None
        self.route: Route | None = None
        self.prompt_tokens = len(token_ids)
        self.cached_tokens = 0
        self.retries = 0
        self._stream: GenerateStream | ForeignStream | None = None
        self._first: GenerateFrame | TextFrame | None = None
        self._reported_completion_tokens: int | None = None  # a foreign backend's usage
        self._uncached = 0
        self._got_first = False
        self._accounted = False
        self._noted = False  # this attempt's decision is in the metrics and the span
        self._hand_out_deltas = True  # False: run() reads the answer whole

    # ---- accounting ------------------------------------------------------------------

    def _begin(self, route: Route) -> None:
        replica = route.replica
        self.replica, self.route = replica, route
        self._uncached = max(len(self.token_ids) - route.decision.predicted_cached_tokens, 0)
        self._got_first = False
        self._accounted = True
        self._noted = False
        replica.in_flight += 1
        replica.prefill_queued += self._uncached
        self.pool.inflight.add(replica.url, route.block_hashes)

    def _note(self) -> None:
        """What the request needs only once the replica has it: the decision's metrics and
        span attributes, the detokenizers. Run while the replica works (see `start`)."""
        if self._noted:
            return
        self._noted = True
        route, replica = self.route, self.replica
        assert route is not None and replica is not None
        for sample in self.samples:
            if sample.detokenizer is None:
                sample.detokenizer = self.pool.tokenizer.detokenizer(self.stop, self.token_ids)
        metrics = self.registry.metrics
        metrics.child(metrics.in_flight, replica.url).set(replica.in_flight)
        metrics.child(metrics.decisions, self.pool.policy.name, route.decision.reason).inc()
        metrics.child(metrics.prompt_tokens, replica.url).inc(len(self.token_ids))
        metrics.child(metrics.predicted_cached, replica.url).inc(route.decision.predicted_cached_tokens)
        if self.span is not None:
            self.span.routed(
                policy=self.pool.policy.name,
                replica=replica.url,
                reason=route.decision.reason,
                prompt_tokens=len(self.token_ids),
                predicted_cached_tokens=route.decision.predicted_cached_tokens,
                matched_blocks=route.matched_blocks,
                attempt=self.retries + 1,
            )

    def _first_token(self) -> None:
        assert self.replica is not None
        if not self._got_first:
            self._got_first = True
            self.replica.prefill_queued -= self._uncached
            self.registry.metrics.ttft.observe(time.perf_counter() - self.arrived)
            if self.span is not None:
                self.span.first_token()

    def _end(self, outcome: str) -> None:
        if not self._accounted or self.replica is None:
            return
        self._accounted = False
        replica = self.replica
        if not self._got_first:
            replica.prefill_queued -= self._uncached
        replica.in_flight -= 1
        assert self.route is not None
        self.pool.inflight.remove(replica.url, self.route.block_hashes)
        metrics = self.registry.metrics
        metrics.child(metrics.in_flight, replica.url).set(replica.in_flight)
        metrics.child(metrics.requests, replica.url, outcome).inc()

    # ---- start, with retries ---------------------------------------------------------

    async def start(self) -> None:
        registry, config = self.registry, self.registry.config
        assert registry.session is not None
        tried: list[str] = []
        hashes: list[int] | None = None
        last = "no healthy replica"
        overloaded = 0  # replicas that answered 429 (queue full)
        for _ in range(config.max_attempts):
            started = time.perf_counter()
            try:
                route = self.pool.choose(
                    self.token_ids, self.request.cache_salt, self.session_id, tried, hashes
                )
            except NoReplicaAvailable:
                break
            registry.metrics.routing_time.observe(time.perf_counter() - started)
            hashes = route.block_hashes
            self._begin(route)
            replica = route.replica
            trace_headers = self.span.downstream_headers() if self.span is not None else None
            busy = False
            try:
                if replica.exact:
                    self._stream = await open_generate(
                        registry.session,
                        replica.url,
                        self.request,
                        config.connect_timeout_s,
                        trace_headers,
                        while_waiting=self._note,
                    )
                else:
                    if self.request.logprobs is not None:
                        raise ApiError(
                            400, "logprobs are not available from this model's backend", param="logprobs"
                        )
                    self._stream = await open_foreign(
                        registry.session,
                        replica.url,
                        self.pool.name,
                        self.request,
                        self.stop,
                        config.connect_timeout_s,
                        trace_headers,
                    )
                first = await self._stream.next()
                if first is None:
                    raise Retryable("the stream ended before the first frame")
            except Retryable as err:
                last, busy = f"{replica.url}: {err}", err.overloaded
            except UpstreamBroken as err:
                last = f"{replica.url}: {err}"
            except ApiError as err:
                if err.status != 503:
                    self._end("rejected")
                    self._finish_span(err.message)
                    raise
                last = f"{replica.url}: {err.message}"
            else:
                registry.record_success(replica)
                self._first = first
                return
            finally:
                self._note()  # done already when the request reached the replica
            self.close("overloaded" if busy else "retried")
            if busy:
                overloaded += 1  # a full queue is load, not a fault: the circuit stays closed
            else:
                registry.record_failure(replica, last)
            registry.metrics.child(registry.metrics.retries, replica.url).inc()
            self.retries += 1
            tried.append(replica.url)
        # The details (replica addresses, socket errors) go to the log, not to the client.
        log.warning("request not served after %d attempts: %s", self.retries, last)
        if overloaded and overloaded == self.retries:
            message = "every replica's queue is full; retry later"
            self._finish_span(message)
            raise ApiError(429, message, code="rate_limit_exceeded", headers={"Retry-After": "1"})
        message = "no replica could serve the request" + (
            " (none is healthy)" if not self.retries else f" ({self.retries} tried)"
        )
        self._finish_span(message)
        raise ApiError(503, message, code="no_replica_available")

    # ---- the stream ------------------------------------------------------------------

    async def deltas(self) -> AsyncIterator[Delta]:
        """Text deltas per sample, then one with its finish_reason; closes the upstream at the end."""
        assert self._stream is not None
        outcome = "error"
        try:
            frames: list[GenerateFrame | TextFrame] = [self._first] if self._first is not None else []
            while frames:
                for frame in frames:
                    for delta in self._apply(frame):
                        yield delta
                    if self._all_finished():
                        if isinstance(self._stream, ForeignStream):
                            await self._read_usage(self._stream)
                        outcome = "ok"
                        return
                try:
                    frames = await self._next_frames()
                except UpstreamBroken as err:
                    assert self.replica is not None
                    self.registry.record_failure(self.replica, str(err))
                    log.warning("replica %s failed mid-stream: %s", self.replica.url, err)
                    raise ApiError(502, "the replica failed mid-stream", code="replica_failed") from None
            assert self.replica is not None
            self.registry.record_failure(self.replica, "stream ended before every sample finished")
            raise ApiError(502, "the replica ended the stream early", code="replica_failed")
        finally:
            self.close(outcome)

    def _all_finished(self) -> bool:
        samples = self.samples
        if len(samples) == 1:  # the common case, checked after every frame
            return samples[0].finish_reason is not None
        return all(s.finish_reason is not None for s in samples)

    async def _next_frames(self) -> list[GenerateFrame | TextFrame]:
        """All frames that have arrived: one wake-up of this task for a burst of frames."""
        stream = self._stream
        assert stream is not None
        if isinstance(stream, GenerateStream):
            return await stream.next_frames()  # type: ignore[return-value]
        frame = await stream.next()
        return [frame] if frame is not None else []

    async def _read_usage(self, stream: ForeignStream) -> None:
        """A foreign backend reports usage after the last choice finished; a broken tail costs only that."""
        try:
            while (frame := await stream.next()) is not None:
                self._apply_text(frame)
        except UpstreamBroken:
            pass

    def _apply(self, frame: GenerateFrame | TextFrame) -> Sequence[Delta]:
        if isinstance(frame, TextFrame):
            return self._apply_text(frame)
        self._first_token()
        sample = self.samples[frame.index]
        if frame.prompt_tokens is not None and frame.index == 0:
            self.prompt_tokens = frame.prompt_tokens
        if frame.cached_tokens is not None and frame.index == 0:
            self.cached_tokens = frame.cached_tokens
            assert self.replica is not None
            metrics = self.registry.metrics
            metrics.child(metrics.delivered_cached, self.replica.url).inc(frame.cached_tokens)
        if sample.finish_reason is not None:
            return _NO_DELTAS
        detokenizer = sample.detokenizer
        assert detokenizer is not None  # made by _note, before any frame came
        text, used = detokenizer.push_many(frame.token_ids)
        if detokenizer.stop_string is not None:
            sample.finish_reason = "stop"
        sample.num_tokens += used
        logprobs = list(frame.logprobs[:used]) if frame.logprobs else []
        sample.logprobs.extend(logprobs)
        if sample.finish_reason is None and frame.finish_reason is not None:
            text += detokenizer.flush()
            sample.finish_reason = frame.finish_reason
        sample.text.append(text)
        if not self._hand_out_deltas:
            return _NO_DELTAS
        out = []
        if text or logprobs:
            out.append(Delta(frame.index, text, logprobs, None))
        if sample.finish_reason is not None:
            out.append(Delta(frame.index, "", [], sample.finish_reason))
        return out

    def _apply_text(self, frame: TextFrame) -> Sequence[Delta]:
        """A foreign backend's frame: text (it applied the stop strings), or its usage."""
        if frame.index is None:
            if frame.prompt_tokens is not None:
                self.prompt_tokens = frame.prompt_tokens
            if frame.completion_tokens is not None:
                self._reported_completion_tokens = frame.completion_tokens
            if frame.cached_tokens is not None:
                self.cached_tokens = frame.cached_tokens
                assert self.replica is not None
                metrics = self.registry.metrics
                metrics.child(metrics.delivered_cached, self.replica.url).inc(frame.cached_tokens)
            return _NO_DELTAS
        if not 0 <= frame.index < len(self.samples):
            raise ApiError(502, f"the backend sent choice {frame.index} of {len(self.samples)}")
        self._first_token()
        sample = self.samples[frame.index]
        if sample.finish_reason is not None:
            return _NO_DELTAS
        if frame.text:
            sample.text.append(frame.text)
            sample.num_tokens += 1  # a stream chunk per token, as vLLM and SGLang send; usage corrects it
        if frame.finish_reason is not None:
            sample.finish_reason = frame.finish_reason
        if not self._hand_out_deltas:
            return _NO_DELTAS
        out = []
        if frame.text:
            out.append(Delta(frame.index, frame.text, [], None))
        if frame.finish_reason is not None:
            out.append(Delta(frame.index, "", [], frame.finish_reason))
        return out

    async def run(self) -> None:
        """Read the answer to its end (a non-streamed request): the samples hold the text.
        No delta is made, so the loop in deltas() goes through every frame that has come
        without building or handing one out (no resumption of this coroutine per frame)."""
        self._hand_out_deltas = False
        async for _ in self.deltas():
            pass

    def close(self, outcome: str = "cancelled") -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        self._end(outcome)
        if outcome not in ("retried", "overloaded"):
            unfinished = any(s.finish_reason is None for s in self.samples)
            self._finish_span("the request ended before it finished" if unfinished else None)

    def _finish_span(self, error: str | None) -> None:
        span, self.span = self.span, None
        if span is None:
            return
        span.finished(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cached_tokens=self.cached_tokens,
            finish_reasons=[s.finish_reason for s in self.samples],
            retries=self.retries,
        )
        span.end(error)

    @property
    def completion_tokens(self) -> int:
        if self._reported_completion_tokens is not None:
            return self._reported_completion_tokens
        samples = self.samples
        return samples[0].num_tokens if len(samples) == 1 else sum(s.num_tokens for s in samples)
