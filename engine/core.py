"""The engine core: the step loop of three calls, schedule -> execute -> update.

No web dependency, no threads: whoever owns an EngineCore calls `step()` in a loop and
`add_request` / `abort` between steps.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cache.block_pool import BlockPool
from cache.events import KVEvent, KVEventQueue
from cache.hashing import BlockHasher, pack_token_ids
from cache.radix_tree import RadixCache
from engine.config import EngineConfig
from engine.cuda_graphs import DecodeGraphs, capture_stream, scratch_blocks_needed
from engine.detokenizer import IncrementalDetokenizer, backend_tokenizer
from engine.kv_cache import allocate_kv_caches, blocks_for_memory
from engine.kv_manager import KVCacheManager
from engine.model_store import is_default_model, resolve_model
from engine.piecewise_graphs import PiecewiseGraphs
from engine.request import FinishReason, Request
from engine.runner import LaunchedStep, ModelRunner
from engine.sampling_params import SamplingParams
from engine.scheduler import SchedulePlan, Scheduler, SchedulerConfig
from engine.skinny import use_skinny_matmuls
from engine.step_shape import PlanShape, describe_plan
from engine.structured import GrammarError, StructuredOutputs
from engine.weights import LoadedModel, load_model
from policies.eviction import eviction_policy
from policies.queue import queue_policy

if TYPE_CHECKING:
    from engine.step_log import StepLog  # msgspec: only where a log is written


class InvalidRequestError(ValueError):
    """A request the engine cannot take as sent; the message is meant for the user."""


@dataclass(frozen=True, slots=True)
class RequestDelta:
    """What one step did for one request."""

    request: Request
    new_token_ids: tuple[int, ...]
    new_text: str
    finished: bool


@dataclass(frozen=True, slots=True)
class _InFlight:
    """A launched step whose sampled values the host has not read yet."""

    plan: SchedulePlan
    launched: LaunchedStep
    started: float  # when its step() call began
    launch_s: float
    kind: str
    described: PlanShape | None


@dataclass(slots=True)
class EngineStats:
    steps: int = 0
    tokens_computed: int = 0  # every token run through the model (prefill chunks and decodes)


def _graph_safe(model: torch.nn.Module) -> bool:
    """Whether the model's attention backend can be captured (no host-side slicing by lengths)."""
    backend = model.model.layers[0].self_attn.backend  # type: ignore[union-attr, index]
    return bool(getattr(backend, "supports_cuda_graphs", False))


class EngineCore:
    def __init__(
        self, config: EngineConfig, loaded: LoadedModel | None = None, tokenizer: Any = None
    ) -> None:
        self.config = config
        device = config.torch_device()
        dtype = config.torch_dtype(device)
        if loaded is None:
            loaded = load_model(
                resolve_model(config.model),
                dtype=dtype,
                device=device,
                random_weights=config.load_format == "dummy",
            )
        self.model_config = loaded.config
        # Before the KV pool is sized and graphs are captured: both see the chosen kernels.
        self.skinny_matmuls = use_skinny_matmuls(loaded.model) if config.skinny_matmuls else []
        self.model_id = "SmolLM2-135M-Instruct" if is_default_model(config.model) else loaded.path.name
        self.device = next(loaded.model.parameters()).device
        self.dtype = next(loaded.model.parameters()).dtype
        self.num_blocks = config.num_blocks or self._blocks_from_memory()
        self.block_size = config.block_size
        self.max_model_len = min(
            config.max_model_len or self.model_config.max_position_embeddings,
            self.model_config.max_position_embeddings,
            self.num_blocks * self.block_size,
        )
        self._tokenizer = backend_tokenizer(tokenizer) if tokenizer is not None else None

        self.pool = BlockPool(self.num_blocks)
        self.events = KVEventQueue()
        self.tree = (
            RadixCache(self.pool, self.block_size, eviction_policy(config.eviction_policy), self.events)
            if config.enable_prefix_caching
            else None
        )
        self.hasher = BlockHasher(model_id=self.model_id, block_size=self.block_size)
        self.kv = KVCacheManager(self.pool, self.hasher, self.tree)
        self.scheduler = Scheduler(
            SchedulerConfig(max_num_seqs=config.max_num_seqs, max_batched_tokens=config.max_batched_tokens),
            self.kv,
            queue_policy(config.queue_policy),
        )
        use_graphs = config.cuda_graphs and self.device.type == "cuda" and _graph_safe(loaded.model)
        # With graphs, a few blocks outside the pool take the padding rows' K/V.
        scratch = scratch_blocks_needed(self.block_size, config.max_num_seqs) if use_graphs else 0
        kv_caches = allocate_kv_caches(
            self.model_config, self.num_blocks + scratch, self.block_size, self.dtype, self.device
        )
        graphs = piecewise = None
        stream = capture_stream(self.device) if use_graphs else None
        if use_graphs:
            graphs = DecodeGraphs(
                loaded.model,
                kv_caches,
                self.block_size,
                self.max_model_len,
                max_batch=config.max_num_seqs,
                scratch_block=self.num_blocks,
            )
            graphs.capture(stream)
        if use_graphs and config.piecewise_graphs:
            piecewise = PiecewiseGraphs(
                loaded.model,
                kv_caches,
                max_tokens=config.max_batched_tokens,
                scratch_slot=self.num_blocks * self.block_size,
            )
            piecewise.capture(stream)
        self.runner = ModelRunner(
            loaded.model, kv_caches, self.block_size, graphs, config.max_num_seqs, piecewise
        )
        # Plan step N+1 while the GPU runs step N; off on a CPU, where nothing runs meanwhile.
        self.overlap = (
            config.overlap_scheduling if config.overlap_scheduling is not None else self.device.type == "cuda"
        )
        self._in_flight: _InFlight | None = None
        self._last_read_back = 0.0
        self.structured = StructuredOutputs(
            self._tokenizer,
            self.model_config.vocab_size,
            self.model_config.eos_token_ids,
            self.device,
            max_rows=config.max_num_seqs,
        )
        self.stats = EngineStats()
        self.step_log: StepLog | None = None  # a record of every step, when set (engine/step_log.py)
        self._arrivals = itertools.count()
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        torch.manual_seed(config.seed)

    def _blocks_from_memory(self) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * self.config.gpu_memory_fraction)
        else:
            budget = int(self.config.cpu_kv_cache_gib * (1 << 30))
        blocks = blocks_for_memory(self.model_config, self.config.block_size, self.dtype, budget)
        if blocks < 1:
            raise RuntimeError("no memory left for the KV cache")
        return blocks

    # -- requests ----------------------------------------------------------------------
    def add_request(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
        cache_salt: str | None = None,
        detokenize: bool = True,
    ) -> Request:
        request_id = request_id or uuid.uuid4().hex
        prompt = list(prompt_token_ids)
        packed_prompt = self._validate(prompt, params)
        matcher = None
        if params.grammar is not None:
            try:
                matcher = self.structured.new_matcher(params.grammar)
            except GrammarError as err:
                raise InvalidRequestError(str(err)) from None
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        request = Request(
            request_id=request_id,
            token_ids=prompt,
            num_prompt_tokens=len(prompt),
            params=params,
            arrival_seq=next(self._arrivals),
            cache_salt=cache_salt,
            eos_token_ids=frozenset(self.model_config.eos_token_ids),
            max_total_tokens=self.max_model_len,
            generator=generator,
            packed_prompt=packed_prompt,
        )
        self.scheduler.add(request)
        if matcher is not None:
            self.structured.attach(request_id, matcher)
        if detokenize and self._tokenizer is not None:
            self._detokenizers[request_id] = IncrementalDetokenizer(
                self._tokenizer, params.stop, prompt_token_ids=prompt
            )
        return request

    def _validate(self, prompt: list[int], params: SamplingParams) -> bytes:
        """Checks the prompt; returns its ids packed as the block hashes read them."""
        if not prompt:
            raise InvalidRequestError("the prompt is empty")
        vocab = self.model_config.vocab_size
        # Packing range-checks in C (negative or past u32 raises), then one numpy max over
        # the buffer: ~50 us for 8k tokens, against ~200 us for min() + max() over the list,
        # which the engine loop spends before any other request's next step. The packed ids
        # are kept: the scheduler hashes the prompt's blocks from them.
        try:
            packed = pack_token_ids(prompt)
            in_range = int(np.frombuffer(packed, dtype="<u4").max()) < vocab
        except ValueError:
            packed, in_range = b"", False
        if not in_range:
            bad = next(t for t in prompt if not (isinstance(t, int) and 0 <= t < vocab))
            raise InvalidRequestError(f"token id {bad} is outside the vocabulary (0..{vocab - 1})")
        if len(prompt) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(prompt)} tokens; this model's maximum context length is "
                f"{self.max_model_len} tokens, and at least one must be left to generate"
            )
        if len(prompt) + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"max_tokens={params.max_tokens} does not fit: the prompt has {len(prompt)} tokens "
                f"and the maximum context length is {self.max_model_len} tokens"
            )
        return packed

    def abort(self, request_id: str) -> bool:
        """Stop a request now; its blocks are freed (or stay cached) before this returns."""
        self._detokenizers.pop(request_id, None)
        self.structured.free(request_id)
        return self.scheduler.abort(request_id)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work or self._in_flight is not None

    # -- the step ----------------------------------------------------------------------
    def step(self) -> list[RequestDelta]:
        """Plan and launch one step; return what the host learnt this call.

        With overlap on, the step launched here is read back during the next call: the host
        plans and launches step N+1 while the GPU runs step N, and the deltas returned are
        step N's. Steps that need their sampled values before the next one can be planned
        (grammars, penalties) are read back in the same call.
        """
        started = time.perf_counter()
        plan = self.scheduler.schedule()
        if plan.is_empty:
            if self._in_flight is not None:
                return self._read_back(self._take_in_flight())
            if self.scheduler.has_work and not self.scheduler.running:
                raise RuntimeError(
                    "the scheduler admitted nothing with an empty batch: the pool is too small"
                )
            return []
        # Started before the forward, so the grammar masks are computed while the model runs.
        grammar_mask = self.structured.begin_step(plan) if self.structured.active else None
        # Described before the step runs: finishing requests give their blocks back later.
        described = describe_plan(plan, self.block_size) if self.step_log is not None else None
        launching = time.perf_counter()
        try:
            launched = self.runner.launch(plan, grammar_mask)
        finally:
            if grammar_mask is not None:
                grammar_mask.settle()
        current = _InFlight(
            plan, launched, started, time.perf_counter() - launching, self.runner.last_step_kind, described
        )
        self.stats.steps += 1
        self.stats.tokens_computed += plan.num_tokens
        self.scheduler.advance(plan, launched.first_slot)
        deltas = self._read_back(self._take_in_flight()) if self._in_flight is not None else []
        if self._may_overlap(plan):
            self._in_flight = current
        else:
            deltas += self._read_back(current)
        return deltas

    def _may_overlap(self, plan: SchedulePlan) -> bool:
        # A grammar's next mask and the penalties' token counts need this step's values.
        return (
            self.overlap
            and not self.structured.active
            and not any(chunk.request.params.needs_penalties for chunk in plan.chunks)
        )

    def _take_in_flight(self) -> _InFlight:
        in_flight = self._in_flight
        assert in_flight is not None
        self._in_flight = None
        return in_flight

    def _read_back(self, step: _InFlight) -> list[RequestDelta]:
        waiting = time.perf_counter()
        sampled = step.launched.sampled()
        waited_s = time.perf_counter() - waiting
        touched = self.scheduler.resolve(step.plan, sampled)
        if self.structured.active:
            for request, reason in self.structured.advance(touched):
                self.scheduler.finish(request, reason)
        deltas = [self._delta(request) for request in touched]
        if self.structured.active:
            for delta in deltas:
                if delta.finished:
                    self.structured.free(delta.request.request_id)
        finished = time.perf_counter()
        if self.step_log is not None and step.described is not None:
            # Overlapped steps share wall time: each is charged from when the previous one
            # was read back (or its own start, if later) to its own read-back.
            step_s = finished - max(step.started, self._last_read_back)
            self.step_log.record(step.described, step_s, step.launch_s + waited_s, step.kind)
        self._last_read_back = finished
        return deltas

    def _delta(self, request: Request) -> RequestDelta:
        token_id = request.token_ids[-1]
        text = ""
        detokenizer = self._detokenizers.get(request.request_id)
        if detokenizer is not None:
            text = detokenizer.push(token_id)
            if detokenizer.stop_string is not None and not request.is_finished:
                self.scheduler.finish(request, FinishReason.STOP)
                request.stop_reason = detokenizer.stop_string
            if request.is_finished:
                text += detokenizer.flush()
                del self._detokenizers[request.request_id]
        return RequestDelta(request, (token_id,), text, request.is_finished)

    def drain_kv_events(self) -> list[tuple[int, KVEvent]]:
        return self.events.drain()

    def check_integrity(self) -> None:
        self.scheduler.check_integrity()
        orphans = self.structured.request_ids() - {
            r.request_id for r in (*self.scheduler.running, *self.scheduler.waiting)
        }
        if orphans:
            raise AssertionError(f"grammar matchers outlive their requests: {sorted(orphans)}")

    def describe(self) -> str:
        return (
            f"{self.model_id} on {self.device} ({str(self.dtype).removeprefix('torch.')}), "
            f"KV pool {self.num_blocks} blocks x {self.block_size} tokens, "
            f"max context {self.max_model_len}, prefix cache {'on' if self.tree else 'off'}"
        )
