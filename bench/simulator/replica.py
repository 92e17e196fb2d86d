"""One simulated engine replica: the real cache, the engine's scheduling rules, a step-time model.

The cache is the engine's own: a BlockPool, a RadixCache publishing KV events, and the
engine's KVCacheManager (prefix match on admission, in-flight dedup of shared prefixes,
allocation with eviction, commit of every completed block, release). The scheduling rules
are engine/scheduler.py's, ported step for step: running requests first (decodes, then
prefill chunks in progress), then waiting requests in arrival order, within a token budget
and a sequence cap; when blocks run out, the newest running request is preempted.

What the model adds is time: a step's duration comes from the LatencyModel. A run of
pure-decode steps (nothing to prefill, nothing admissible) is simulated as one segment of k
identical steps, ending at the first finish; an arrival cuts the segment short at the end of
the step in progress. That keeps a 64-replica run at thousands of events instead of millions
of steps, with the same token and block accounting as stepping one at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from bench.simulator.config import ReplicaConfig
from bench.simulator.latency import LatencyModel
from bench.simulator.step_cost import step_ms
from cache.block_pool import BlockPool
from cache.events import KVEventQueue
from cache.hashing import BlockHasher
from cache.radix_tree import RadixCache
from engine.kv_manager import KVCacheManager


@dataclass(eq=False, slots=True)
class SimRequest:
    """A request as the engine sees it; field names are the ones KVCacheManager reads."""

    request_id: str
    arrival_seq: int
    token_ids: np.ndarray  # prompt then the whole answer; only computed tokens are ever read
    block_hashes: list[int]  # of every full block of token_ids
    prompt_len: int
    output_len: int
    arrival_s: float
    cache_salt: str | None = None
    packed_prompt: bytes = b""  # none: its hashes are made from token_ids
    generated: int = 0
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    tree_node: object = None
    num_tree_blocks: int = 0
    num_cached_tokens: int = -1  # set at first admission (what usage.cached_tokens reports)
    running: bool = False
    first_token_s: float | None = None
    finish_s: float | None = None
    replica: int = -1
    predicted_cached: int = 0
    num_preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        return self.prompt_len + self.generated

    @property
    def num_remaining_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens


@dataclass(slots=True)
class Step:
    """What the replica is computing now: `steps` identical steps of `chunks`, ending at `end_s`."""

    chunks: dict[SimRequest, int]
    start_s: float
    step_s: float
    steps: int

    @property
    def end_s(self) -> float:
        return self.start_s + self.step_s * self.steps


class SimReplica:
    def __init__(self, index: int, config: ReplicaConfig, latency: LatencyModel) -> None:
        self.index = index
        self.config = config
        self.latency = latency
        self.pool = BlockPool(config.num_blocks)
        self.events = KVEventQueue(maxlen=1 << 22)
        self.tree = RadixCache(self.pool, config.block_size, events=self.events)
        self.kv = KVCacheManager(self.pool, BlockHasher(config.model_id, config.block_size), self.tree)
        self.waiting: list[SimRequest] = []
        self.running: list[SimRequest] = []
        self.current: Step | None = None
        self.busy_s = 0.0
        self.num_steps = 0
        self.num_preemptions = 0
        self.prompt_tokens_admitted = 0
        self.cached_tokens_admitted = 0

    # -- what the gateway's /load reports --------------------------------------------------
    @property
    def kv_usage(self) -> float:
        used = self.pool.num_blocks - self.pool.num_free - self.tree.num_evictable_blocks
        return used / self.pool.num_blocks

    def add(self, request: SimRequest) -> None:
        if request.prompt_len + request.output_len > self.config.num_blocks * self.config.block_size:
            raise ValueError(f"request {request.request_id} cannot fit this replica's KV cache")
        self.waiting.append(request)

    # -- planning ------------------------------------------------------------------------
    def plan(self, now: float) -> Step | None:
        """Choose the next step (or segment of decode steps) at `now`; None when idle."""
        if not self.waiting and not self.running:
            return None
        chunks, preempted = self._schedule()
        if not chunks:
            if preempted or self.waiting:
                # Everything waits on memory that only a finish frees, or on nothing at all:
                # a bug in the accounting, since a running request always gets its decode.
                raise RuntimeError(f"replica {self.index} is stuck with {len(self.waiting)} waiting")
            return None
        steps = self._segment_length(chunks) if not preempted else 1
        step_s = self._step_seconds(chunks, steps)
        self.current = Step(chunks, now, step_s, steps)
        return self.current

    def _schedule(self) -> tuple[dict[SimRequest, int], list[SimRequest]]:
        kv = self.kv
        budget = self.config.max_batched_tokens
        chunks: dict[SimRequest, int] = {}
        preempted: list[SimRequest] = []
        decodes = [r for r in self.running if r.num_remaining_tokens == 1]
        prefills = [r for r in self.running if r.num_remaining_tokens > 1]
        for request in decodes + prefills:
            if budget == 0:
                break
            if not request.running:
                continue  # preempted earlier in this loop
            if request.num_remaining_tokens > 1:
                kv.extend_match(request)
                if kv.waits_for_another(request):
                    continue
            count = min(request.num_remaining_tokens, budget)
            while not kv.allocate(request, count):
                victim = max(self.running, key=lambda r: r.arrival_seq)
                budget += chunks.pop(victim, 0)
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            if request.running:
                chunks[request] = count
                budget -= count
        if not preempted:
            self._admit(chunks, budget)
        return chunks, preempted

    def _admit(self, chunks: dict[SimRequest, int], budget: int) -> None:
        kv = self.kv
        for request in sorted(self.waiting, key=lambda r: r.arrival_seq):
            if budget == 0 or len(self.running) >= self.config.max_num_seqs:
                break
            cached = kv.match(request)
            if kv.waits_for_another(request):
                kv.release(request)
                continue
            count = min(request.num_remaining_tokens, budget)
            if not kv.allocate(request, count, reserve=len(self.running)):
                kv.release(request)
                break
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = cached
                self.prompt_tokens_admitted += request.prompt_len
                self.cached_tokens_admitted += cached
            self.waiting.remove(request)
            request.running = True
            self.running.append(request)
            kv.claim(request)
            chunks[request] = count
            budget -= count

    def _preempt(self, request: SimRequest) -> None:
        self.running.remove(request)
        self.kv.release(request)
        request.running = False
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(request)

    def _segment_length(self, chunks: dict[SimRequest, int]) -> int:
        """How many identical decode steps can run before anything but time changes."""
        if self.waiting or any(n != 1 or r.num_remaining_tokens != 1 for r, n in chunks.items()):
            # A waiting request may become admissible as soon as a block is committed.
            return 1
        steps = min(r.output_len - r.generated for r in chunks)
        steps = max(1, min(steps, self.config.max_segment_steps))
        # Blocks for steps 2..k (step 1's are allocated); shrink k until they fit.
        while steps > 1 and self._extra_blocks(chunks, steps) > self.kv.num_available_blocks:
            steps //= 2
        if steps > 1:
            for request in chunks:
                ok = self.kv.allocate(request, steps)
                assert ok, "checked above"
        return steps

    def _extra_blocks(self, chunks: dict[SimRequest, int], steps: int) -> int:
        return sum(self.kv.blocks_needed(r, steps) for r in chunks)

    def _step_seconds(self, chunks: dict[SimRequest, int], steps: int) -> float:
        """The step as the engine runs it (bench/simulator/step_cost.py)."""
        decodes: list[SimRequest] = []
        prompts: list[tuple[int, int]] = []
        for request, count in chunks.items():
            # A one-token prompt chunk (a step budget run down to one) rides with the decodes,
            # in the runner's decode graph too: one query row over its cached context.
            if count == 1:
                decodes.append(request)
            else:
                prompts.append((count, request.num_computed_tokens))
        # The middle of a segment stands for all of it: each decode's KV grows by 1 per step.
        decode_kv = self._distinct_kv_tokens(decodes) + len(decodes) * (steps - 1) / 2
        ms = step_ms(self.latency, len(decodes), decode_kv, prompts, self.config.rules)
        return ms / 1000.0

    def _distinct_kv_tokens(self, decodes: list[SimRequest]) -> int:
        """KV tokens the decodes read: a block shared by several counted once when the model
        says so (dedup_shared_kv), else once per row.

        Once is what the offline shared-prefix batch shows (256 rows on 8 prefixes of 2,048
        tokens: repeats come from the GPU's L2; per row under-predicts it by 30-40%). Served
        batches (1-128 rows) show no such reuse: in a 2-GPU run's step logs a key read again
        cost as much as a distinct one (bench.step_fit), so a model fitted on served steps
        (H200) counts per row.
        """
        if not self.latency.dedup_shared_kv:
            return sum(r.num_computed_tokens for r in decodes)
        size = self.config.block_size
        root = self.tree.root
        seen: set[int] = set()
        tokens = 0
        for request in decodes:
            tokens += request.num_computed_tokens - request.num_tree_blocks * size
            node = request.tree_node
            while node is not None and node is not root and id(node) not in seen:
                seen.add(id(node))
                tokens += len(node.block_ids) * size  # type: ignore[attr-defined]
                node = node.parent  # type: ignore[attr-defined]
        return tokens

    # -- finishing a step ----------------------------------------------------------------
    def cut_short(self, now: float) -> bool:
        """An arrival at `now`: end the current segment after the step in progress.

        Returns True when the segment's end moved (the caller reschedules its end event).
        """
        step = self.current
        if step is None or step.steps == 1:
            return False
        done = min(step.steps, math.floor((now - step.start_s) / step.step_s) + 1)
        if done >= step.steps:
            return False
        step.steps = max(done, 1)
        return True

    def finish_step(self) -> tuple[list[SimRequest], list[SimRequest]]:
        """Apply the current step(s); return (requests that got their first token, finished)."""
        step = self.current
        assert step is not None
        self.current = None
        now = step.end_s
        self.busy_s += step.step_s * step.steps
        self.num_steps += step.steps
        first: list[SimRequest] = []
        finished: list[SimRequest] = []
        for request, count in step.chunks.items():
            if not request.running:
                continue
            decoding = request.first_token_s is not None
            samples = request.num_computed_tokens + count == request.num_tokens
            request.num_computed_tokens += count * step.steps
            if samples:
                request.generated += step.steps
            done = request.generated >= request.output_len
            # The engine commits every completed block at once; a decode's blocks are only
            # committed here when it finishes: nothing can match them earlier (a request that
            # quotes an answer arrives after it), and they are locked until then anyway.
            if not decoding or done:
                self.kv.commit(request)
            if samples and not decoding:
                request.first_token_s = now
                first.append(request)
            if done:
                self._finish(request, now)
                finished.append(request)
        return first, finished

    def _finish(self, request: SimRequest, now: float) -> None:
        self.running.remove(request)
        self.kv.release(request)
        request.running = False
        request.finish_s = now
