"""Discrete-event replay of a trace against N simulated replicas behind the gateway's routing.

Events (a heap of (time, sequence number, ...), so equal times resolve in push order and a
run is a pure function of its inputs): a request arrives and is routed; a replica's step (or
decode segment) ends; the gateway polls every replica's load. A request listed `after`
others arrives its think time after the last of them finished.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.simulator.config import ReplicaConfig
from bench.simulator.latency import H100_80GB, LatencyModel
from bench.simulator.metrics import RequestRecord, RunSummary, summarize
from bench.simulator.replica import SimReplica, SimRequest
from bench.simulator.router import OracleRouting, SimGateway
from bench.workloads.trace import Segment, TokenBook, Trace, TraceRequest
from cache.hashing import BlockHasher
from policies.routing import RoutingPolicy, routing_policy


@dataclass(frozen=True)
class SimulationConfig:
    num_replicas: int
    policy: str = "kv_aware"
    replica: ReplicaConfig = field(default_factory=ReplicaConfig)
    latency: LatencyModel = H100_80GB
    load_interval_s: float = 0.5  # gateway/config.py's load_interval_s
    policy_options: tuple[tuple[str, Any], ...] = ()


class PreparedTrace:
    """A trace's token ids and block hashes, computed once and shared by every run of it."""

    def __init__(self, trace: Trace, block_size: int = 16, model_id: str = "sim/llama3-8b") -> None:
        self.trace = trace
        self.block_size = block_size
        self.model_id = model_id
        book = TokenBook(trace.header.vocab_size)
        hasher = BlockHasher(model_id, block_size)
        self.tokens: list[np.ndarray] = []
        self.hashes: list[list[int]] = []
        self.prompt_lens: list[int] = []
        known: dict[tuple[int, ...], list[int]] = {}
        for request in trace.requests:
            tokens = book.tokens([*request.prompt, _answer(request)])
            # Prompts often extend an earlier prompt (a chat's next turn): reuse its hashes.
            prefix_key = tuple(s.key for s in request.prompt[:-1])
            hashes = hasher.hashes(tokens, known=_usable(known.get(prefix_key), request, block_size))
            known[(*(s.key for s in request.prompt), request.output_key)] = hashes
            self.tokens.append(tokens)
            self.hashes.append(hashes)
            self.prompt_lens.append(request.prompt_len)


def _answer(request: TraceRequest) -> Segment:
    return Segment(request.output_key, request.output_len)


def _usable(hashes: list[int] | None, request: TraceRequest, block_size: int) -> list[int]:
    """The known hashes that lie inside this request's prompt minus its last segment."""
    if hashes is None:
        return []
    shared = sum(s.length for s in request.prompt[:-1]) // block_size
    return hashes[: min(shared, len(hashes))]


def make_policy(name: str, options: dict[str, Any]) -> RoutingPolicy:
    if name == "oracle":
        return OracleRouting()
    return routing_policy(name, **options)


class Simulation:
    def __init__(self, prepared: PreparedTrace, config: SimulationConfig) -> None:
        if config.num_replicas < 1:
            raise ValueError("num_replicas must be >= 1")
        if config.replica.block_size != prepared.block_size:
            raise ValueError("the trace was hashed with another block size")
        self.prepared = prepared
        self.config = config
        self.replicas = [SimReplica(i, config.replica, config.latency) for i in range(config.num_replicas)]
        self.policy = make_policy(config.policy, dict(config.policy_options))
        if isinstance(self.policy, OracleRouting):
            self.policy.bind(self.replicas)
        self.gateway = SimGateway(self.replicas, self.policy, config.replica.block_size)
        self._heap: list[tuple[float, int, int, int, int]] = []
        self._seq = itertools.count()
        self._versions = [0] * config.num_replicas
        self.requests: list[SimRequest | None] = [None] * len(prepared.trace.requests)
        self.records: list[RequestRecord] = []
        self._index_of = {r.request_id: i for i, r in enumerate(prepared.trace.requests)}
        self._waiting_on: list[int] = [len(r.after) for r in prepared.trace.requests]
        self._ready_at: list[float] = [0.0] * len(prepared.trace.requests)
        self._dependents: dict[int, list[int]] = {}
        for i, request in enumerate(prepared.trace.requests):
            for dep in request.after:
                self._dependents.setdefault(self._index_of[dep], []).append(i)
        self._outstanding = len(prepared.trace.requests)

    # event kinds
    _ARRIVE, _STEP_END, _POLL = 0, 1, 2

    def _push(self, at: float, kind: int, a: int = 0, b: int = 0) -> None:
        heapq.heappush(self._heap, (at, next(self._seq), kind, a, b))

    def run(self, progress: Callable[[int], None] | None = None) -> RunSummary:
        started = time.perf_counter()
        for i, request in enumerate(self.prepared.trace.requests):
            if request.arrival_s is not None:
                self._push(request.arrival_s, self._ARRIVE, i)
        self._push(0.0, self._POLL)
        while self._heap and self._outstanding:
            now, _, kind, a, b = heapq.heappop(self._heap)
            if kind == self._ARRIVE:
                self._arrive(a, now)
            elif kind == self._STEP_END:
                if b == self._versions[a]:
                    self._step_end(a, now)
            else:
                self.gateway.poll_loads()
                self._push(now + self.config.load_interval_s, self._POLL)
        if self._outstanding:
            raise RuntimeError(f"{self._outstanding} requests never finished")
        return summarize(self, time.perf_counter() - started)

    def _arrive(self, i: int, now: float) -> None:
        spec = self.prepared.trace.requests[i]
        hashes = self.prepared.hashes[i]
        request = SimRequest(
            request_id=spec.request_id,
            arrival_seq=i,
            token_ids=self.prepared.tokens[i],
            block_hashes=hashes,
            prompt_len=spec.prompt_len,
            output_len=spec.output_len,
            arrival_s=now,
        )
        self.requests[i] = request
        prompt_hashes = hashes[: spec.prompt_len // self.prepared.block_size]
        chosen, decision = self.gateway.choose(request, prompt_hashes, spec.session_id, now)
        request.replica = chosen
        request.predicted_cached = decision.predicted_cached_tokens
        replica = self.replicas[chosen]
        replica.add(request)
        if replica.current is None:
            self._start(replica, now)
        elif replica.cut_short(now):
            self._versions[chosen] += 1
            self._push(replica.current.end_s, self._STEP_END, chosen, self._versions[chosen])

    def _start(self, replica: SimReplica, now: float) -> None:
        step = replica.plan(now)
        self.gateway.sync_events(replica)  # allocation may have evicted
        if step is not None:
            self._versions[replica.index] += 1
            self._push(step.end_s, self._STEP_END, replica.index, self._versions[replica.index])

    def _step_end(self, index: int, now: float) -> None:
        replica = self.replicas[index]
        first, finished = replica.finish_step()
        self.gateway.sync_events(replica)
        for request in first:
            self.gateway.first_token(request)
        for request in finished:
            self.gateway.finished(request)
            self._done(request, now)
        self._start(replica, now)

    def _done(self, request: SimRequest, now: float) -> None:
        self._outstanding -= 1
        self.records.append(RequestRecord.of(request))
        i = request.arrival_seq
        for j in self._dependents.get(i, ()):
            self._waiting_on[j] -= 1
            spec = self.prepared.trace.requests[j]
            self._ready_at[j] = max(self._ready_at[j], now)
            if self._waiting_on[j] == 0:
                self._push(self._ready_at[j] + spec.think_time_s, self._ARRIVE, j)


def simulate(prepared: PreparedTrace, config: SimulationConfig) -> RunSummary:
    return Simulation(prepared, config).run()
