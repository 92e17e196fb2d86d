"""Continuous batching with chunked prefill around the cached prefix.

Each step: running requests first (decodes, then prefill chunks in progress), then waiting
requests in queue-policy order, within a token budget and a sequence cap. A waiting request
matches its longest cached prefix on admission and only its uncached suffix is computed.
When blocks run out: evict unused cache, then preempt the newest running request.

A step's outcome comes back in two parts, so the next step can be planned while this one
runs on the GPU: `advance` (right after the launch: counters move, each sampling chunk
leaves one pending token) and `resolve` (once the sampled values are on the host: tokens
appended, blocks committed, stop conditions checked). A pending token is decoded by the
next step from the device; a request whose pending tokens already exhaust its length is
not scheduled again, and one that turns out to have stopped wastes one row of one step.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from engine.kv_manager import KVCacheManager
from engine.request import FinishReason, Request, RequestStatus, TokenLogprob
from policies.queue import QueuePolicy, WaitingRequest


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_batched_tokens: int = 2048


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    request: Request
    start: int  # the first token position computed
    num_tokens: int
    samples: bool  # reaches the end of the request's tokens, so the step samples one


@dataclass(frozen=True, slots=True)
class SchedulePlan:
    chunks: tuple[ScheduledChunk, ...]
    preempted: tuple[str, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(chunk.num_tokens for chunk in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclass(frozen=True, slots=True)
class SampledToken:
    token_id: int
    logprob: TokenLogprob | None = None


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, queue_policy: QueuePolicy) -> None:
        self.config = config
        self.kv = kv
        self.queue_policy = queue_policy
        self.waiting: list[Request] = []
        self.running: list[Request] = []  # in arrival order
        self._by_id: dict[str, Request] = {}
        self.num_preemptions = 0
        self.prompt_tokens_admitted = 0  # counted once per request, at its first admission
        self.cached_tokens_admitted = 0

    # -- requests in and out -----------------------------------------------------------
    def add(self, request: Request) -> None:
        if request.request_id in self._by_id:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self._by_id[request.request_id] = request
        self.waiting.append(request)

    def get(self, request_id: str) -> Request | None:
        return self._by_id.get(request_id)

    def finish(self, request: Request, reason: FinishReason) -> None:
        """End a request now (stop, length or abort) and give back its blocks at once."""
        if request.is_finished:
            return
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self.kv.release(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.times.finished = time.perf_counter()
        del self._by_id[request.request_id]

    def abort(self, request_id: str) -> bool:
        request = self._by_id.get(request_id)
        if request is None:
            return False
        self.finish(request, FinishReason.ABORT)
        return True

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- the step ----------------------------------------------------------------------
    def schedule(self) -> SchedulePlan:
        budget = self.config.max_batched_tokens
        chunks: dict[Request, int] = {}
        preempted: list[str] = []

        decodes = [r for r in self.running if r.num_remaining_tokens == 1]
        prefills = [r for r in self.running if r.num_remaining_tokens > 1]
        for request in decodes + prefills:
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            if request.num_pending_tokens and request.length_exhausted:
                continue  # ends when its pending token is read
            if request.num_remaining_tokens > 1:
                self.kv.extend_match(request)
                if self.kv.waits_for_another(request):
                    continue
            count = min(request.num_remaining_tokens, budget)
            while not self.kv.allocate(request, count):
                victim = max(self.running, key=lambda r: r.arrival_seq)
                budget += chunks.pop(victim, 0)
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            if request.status is RequestStatus.RUNNING:
                chunks[request] = count
                budget -= count

        # Admitting while preempting would only thrash: the pool is short already.
        if not preempted:
            budget = self._admit(chunks, budget)

        return SchedulePlan(
            chunks=tuple(
                ScheduledChunk(r, r.num_computed_tokens, n, r.num_computed_tokens + n == r.num_tokens)
                for r, n in chunks.items()
            ),
            preempted=tuple(preempted),
        )

    def _admit(self, chunks: dict[Request, int], budget: int) -> int:
        if not self.waiting:
            return budget
        now = time.perf_counter()
        for request in self._waiting_in_policy_order():
            if budget == 0 or len(self.running) >= self.config.max_num_seqs:
                break
            if request.num_pending_tokens:
                continue  # preempted with a token in flight: matchable once it is read
            cached = self.kv.match(request)
            if self.kv.waits_for_another(request):
                self.kv.release(request)
                continue
            count = min(request.num_remaining_tokens, budget)
            # Keep a block per running request free for its next decode block.
            if not self.kv.allocate(request, count, reserve=len(self.running)):
                self.kv.release(request)
                break
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = cached
                self.prompt_tokens_admitted += request.num_prompt_tokens
                self.cached_tokens_admitted += cached
            if request.times.first_scheduled is None:
                request.times.first_scheduled = now
            self.waiting.remove(request)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self.kv.claim(request)
            chunks[request] = count
            budget -= count
        return budget

    def _waiting_in_policy_order(self) -> list[Request]:
        needs_match = self.queue_policy.needs_prefix_match
        snapshot = [
            WaitingRequest(
                arrival_seq=r.arrival_seq,
                num_tokens=r.num_tokens,
                num_cached_tokens=self.kv.peek_cached_tokens(r) if needs_match else 0,
            )
            for r in self.waiting
        ]
        return [self.waiting[i] for i in self.queue_policy.order(snapshot)]

    def _preempt(self, request: Request) -> None:
        """Free the request's blocks and requeue it; its committed blocks stay cached."""
        self.running.remove(request)
        self.kv.release(request)
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(request)

    def update(self, plan: SchedulePlan, sampled: Sequence[SampledToken]) -> list[Request]:
        """`advance` then `resolve`: a step whose sampled tokens are already on the host."""
        self.advance(plan)
        return self.resolve(plan, sampled)

    def advance(self, plan: SchedulePlan, first_future_slot: int = -1) -> None:
        """Move counters for a launched plan; each sampling chunk leaves a pending token.

        The r-th sampling chunk's token sits on the device at future slot
        `first_future_slot + r` until the host reads it (the runner's numbering).
        """
        slot = first_future_slot
        for chunk in plan.chunks:
            request = chunk.request
            chunk_slot = slot
            slot += chunk.samples
            if request.status is not RequestStatus.RUNNING:
                continue  # aborted since it was scheduled
            if request.num_output_tokens + request.num_pending_tokens == 0:
                request.times.prefill_chunks += 1
            request.num_computed_tokens += chunk.num_tokens
            if chunk.samples:
                request.num_pending_tokens += 1
                request.future_slot = chunk_slot
            self.kv.commit(request)

    def resolve(self, plan: SchedulePlan, sampled: Sequence[SampledToken]) -> list[Request]:
        """Read an advanced plan's sampled values: one per sampling chunk, in chunk order.

        Returns the requests that received a token (some of them now finished).
        """
        now = time.perf_counter()
        touched: list[Request] = []
        samples = iter(sampled)
        for chunk in plan.chunks:
            if not chunk.samples:
                continue
            token = next(samples)
            request = chunk.request
            if request.is_finished:
                continue  # aborted or stopped while the step ran: the token is dropped
            request.append_token(token.token_id, token.logprob, now)
            touched.append(request)
            if request.status is RequestStatus.RUNNING:
                self.kv.commit(request)
            reason = request.stop_by_token(token.token_id)
            if reason is not None:
                self.finish(request, reason)
        return touched

    def check_integrity(self) -> None:
        self.kv.check_integrity(self.running)
        for request in self.waiting:
            if request.block_ids or request.tree_node is not None:
                raise AssertionError(f"waiting request {request.request_id} holds blocks")
