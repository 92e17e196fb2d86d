"""One simulated replica in real time: the simulator's replica stepped by an asyncio task.

The cache and the scheduling rules are bench/simulator/replica.py's SimReplica (the engine's
own BlockPool, RadixCache with KV events and KVCacheManager); its LatencyModel gives each
step's duration. Here the steps run against the wall clock instead of an event queue: plan a
step, sleep until it ends (simulated seconds x time_scale), apply it, hand the tokens it
produced to the requests' streams, publish the KV events it caused. Requests that arrive
meanwhile join at the next step, as in the engine.

If the host falls behind (a step's end has passed when the loop wakes), the next step starts
late: simulated time stretches rather than skipping work. `lag_s` adds the lateness up, so a
benchmark can tell whether the machine kept up with the time scale it asked for.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass, field

import numpy as np

from bench.simulator.config import ReplicaConfig
from bench.simulator.latency import LatencyModel
from bench.simulator.replica import SimReplica, SimRequest
from engine.server.protocol import KVEvent, LoadReport, LoadSnapshot, to_wire

log = logging.getLogger("prefixgate.sim_replica")
_MAX_SUBSCRIBER_BACKLOG = 10_000  # batches; a subscriber this far behind is dropped (it resyncs)


class RequestTooLarge(ValueError):
    """The prompt and answer cannot fit this replica's KV cache even when it is empty."""


@dataclass(eq=False, slots=True)
class Output:
    """Tokens one step (or a few) produced for a request; `finish_reason` on the last."""

    token_ids: list[int]
    finish_reason: str | None = None
    prompt_tokens: int | None = None  # on the first output
    cached_tokens: int | None = None  # on the first output


@dataclass(eq=False, slots=True)
class LiveRequest:
    sim: SimRequest
    answer: np.ndarray
    outputs: asyncio.Queue[Output] = field(default_factory=asyncio.Queue)
    sent: int = 0  # answer tokens handed to `outputs`
    done: bool = False


@dataclass(eq=False, slots=True)
class Subscriber:
    queue: asyncio.Queue[list[KVEvent] | None] = field(default_factory=asyncio.Queue)


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("simulated replica step loop died", exc_info=task.exception())


class SimEngine:
    def __init__(
        self,
        index: int,
        config: ReplicaConfig,
        latency: LatencyModel,
        time_scale: float,
        tokens_per_frame: int = 1,
    ) -> None:
        if time_scale <= 0:
            raise ValueError(f"time_scale must be positive, got {time_scale}")
        # One step at a time: every step's tokens are streamed when that step ends.
        self.config = ReplicaConfig(**{**config.__dict__, "max_segment_steps": 1})
        self.replica = SimReplica(index, self.config, latency)
        self.time_scale = time_scale
        self.tokens_per_frame = max(1, tokens_per_frame)
        self._live: dict[SimRequest, LiveRequest] = {}
        self._arrivals = itertools.count()
        self._wake = asyncio.Event()
        self._subscribers: list[Subscriber] = []
        self._loop = asyncio.get_running_loop()
        self._t0 = self._loop.time()
        self.lag_s = 0.0
        self.late_steps = 0
        # Simulated seconds from a request's arrival here to its first token: TTFT without
        # what a router, the network and the client add.
        self.replica_ttfts_s: list[float] = []
        self._task = asyncio.ensure_future(self._run())
        self._task.add_done_callback(_report_crash)

    # -- clock ---------------------------------------------------------------------------
    def now(self) -> float:
        """Simulated seconds since start."""
        return (self._loop.time() - self._t0) / self.time_scale

    # -- requests ------------------------------------------------------------------------
    def submit(
        self, token_ids: list[int], answer: np.ndarray, cache_salt: str | None, request_id: str
    ) -> LiveRequest:
        replica = self.replica
        output_len = len(answer)
        if len(token_ids) + output_len > self.config.num_blocks * self.config.block_size:
            raise RequestTooLarge(
                f"{len(token_ids)} prompt + {output_len} output tokens do not fit this replica's "
                f"{self.config.num_blocks * self.config.block_size}-token KV cache"
            )
        arrival = next(self._arrivals)
        sim = SimRequest(
            request_id=f"{arrival}:{request_id}",  # the cache's dedup claims need unique ids
            arrival_seq=arrival,
            token_ids=np.concatenate([np.asarray(token_ids, dtype=np.int64), answer]),
            block_hashes=[],  # computed by the KVCacheManager as far as it needs them
            prompt_len=len(token_ids),
            output_len=output_len,
            arrival_s=self.now(),
            cache_salt=cache_salt,
        )
        live = LiveRequest(sim, answer)
        self._live[sim] = live
        replica.add(sim)
        self._wake.set()
        return live

    def abort(self, live: LiveRequest) -> None:
        """The client went away: give back what the request holds."""
        if live.done:
            return
        live.done = True
        self._live.pop(live.sim, None)
        sim = live.sim
        replica = self.replica
        if sim in replica.waiting:
            replica.waiting.remove(sim)
        if sim.running:
            replica.running.remove(sim)
            replica.kv.release(sim)
            sim.running = False
        self._publish()

    # -- the step loop -------------------------------------------------------------------
    async def _run(self) -> None:
        replica = self.replica
        loop = self._loop
        while True:
            if not replica.waiting and not replica.running:
                self._wake.clear()
                await self._wake.wait()
            step = replica.plan(self.now())
            self._publish()
            if step is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            end = self._t0 + step.end_s * self.time_scale
            delay = end - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            late = loop.time() - end
            if late > 0.002:
                self.lag_s += late
                self.late_steps += 1
            produced = {r: r.generated for r in step.chunks}
            first, finished = replica.finish_step()
            firsts = set(first)
            done = set(finished)
            for sim, before in produced.items():
                live = self._live.get(sim)
                if live is None or sim.generated == before:
                    continue
                self._deliver(live, sim in firsts, sim in done)
            self._publish()

    def _deliver(self, live: LiveRequest, first: bool, finished: bool) -> None:
        sim = live.sim
        pending = sim.generated - live.sent
        if not (first or finished or pending >= self.tokens_per_frame):
            return  # held back: a few steps' tokens go out in one frame
        output = Output([int(t) for t in live.answer[live.sent : sim.generated]])
        live.sent = sim.generated
        if first:
            assert sim.first_token_s is not None
            self.replica_ttfts_s.append(sim.first_token_s - sim.arrival_s)
            output.prompt_tokens = sim.prompt_len
            output.cached_tokens = max(sim.num_cached_tokens, 0)
        if finished:
            output.finish_reason = "length"
            live.done = True
            self._live.pop(sim, None)
        live.outputs.put_nowait(output)

    # -- KV events -----------------------------------------------------------------------
    def _publish(self) -> None:
        drained = self.replica.events.drain()
        if not drained or not self._subscribers:
            return
        batch = [to_wire(seq, event) for seq, event in drained]
        for subscriber in list(self._subscribers):
            if subscriber.queue.qsize() > _MAX_SUBSCRIBER_BACKLOG:
                self.unsubscribe(subscriber)
                subscriber.queue.put_nowait(None)
            else:
                subscriber.queue.put_nowait(batch)

    def subscribe(self) -> tuple[Subscriber, int, list[int]]:
        """A new subscriber with the cache's hashes and the seq they are consistent with."""
        self._publish()  # everything before the snapshot goes to the subscribers already there
        subscriber = Subscriber()
        self._subscribers.append(subscriber)
        hashes = sorted(self.replica.tree.cached_block_hashes())
        return subscriber, self.replica.events.last_seq, hashes

    def unsubscribe(self, subscriber: Subscriber) -> None:
        if subscriber in self._subscribers:
            self._subscribers.remove(subscriber)

    # -- load ----------------------------------------------------------------------------
    def load(self, model: str) -> LoadReport:
        replica = self.replica
        pool = replica.pool
        evictable = replica.tree.num_evictable_blocks
        used = pool.num_blocks - pool.num_free - evictable
        return LoadReport(
            model=model,
            in_flight=len(self._live),
            max_in_flight=1 << 20,
            engine=LoadSnapshot(
                running=len(replica.running),
                waiting=len(replica.waiting),
                num_blocks=pool.num_blocks,
                free_blocks=pool.num_free,
                cached_blocks=replica.tree.num_cached_blocks,
                used_blocks=used,
                kv_usage=used / pool.num_blocks,
                num_preemptions=replica.num_preemptions,
                prompt_tokens_admitted=replica.prompt_tokens_admitted,
                cached_tokens_admitted=replica.cached_tokens_admitted,
                steps=replica.num_steps,
                kv_events_dropped=replica.events.dropped,
            ),
        )

    def stats(self) -> dict[str, float | list[float]]:
        replica = self.replica
        return {
            "simulated_s": self.now(),
            "busy_s": replica.busy_s,
            "steps": replica.num_steps,
            "lag_s": self.lag_s,
            "late_steps": self.late_steps,
            "prompt_tokens_admitted": replica.prompt_tokens_admitted,
            "cached_tokens_admitted": replica.cached_tokens_admitted,
            "preemptions": replica.num_preemptions,
            "replica_ttfts_s": self.replica_ttfts_s,
        }

    async def close(self) -> None:
        self._task.cancel()
        for subscriber in self._subscribers:
            subscriber.queue.put_nowait(None)
