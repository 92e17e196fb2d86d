"""Per-sequence grammar state for the step loop: matchers, the step's token mask, advancing.

One llguidance matcher per request (each of the n samples is its own request). A matcher has
consumed exactly the request's output tokens. Preemption keeps those tokens (recompute only
rebuilds the KV), so a preempted request keeps its matcher unchanged and resumes where it was.

The step, without stalling the loop:

1. `begin_step(plan)` hands the mask fill for the rows that sample with a grammar to a worker
   thread, BEFORE the forward starts. llguidance's batched fill drops the GIL, so it runs
   while the model computes (on a GPU the forward is only kernel launches anyway);
2. the runner calls `PendingMask.blocked(device)` once the logits exist: the packed mask goes
   to the logits' device and is unpacked there; the sampler sets blocked tokens to -inf;
3. `advance(touched)` feeds each sampled token to its matcher and reports the requests whose
   grammar is complete (finish_reason "stop") or broken (abort).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from engine.request import FinishReason, Request
from engine.sampling_params import Grammar
from engine.structured.bitmask import allocate_bitmask, blocked_tokens
from engine.structured.compiler import GrammarCompiler

if TYPE_CHECKING:
    from engine.scheduler import SchedulePlan

log = logging.getLogger("prefixgate.engine.structured")

# The unpacking reads int32 words as bytes in memory order.
assert sys.byteorder == "little", "token bitmasks assume a little-endian host"


class PendingMask:
    """The token mask of one step's sampling rows, being filled on the worker thread."""

    def __init__(self, future: Future[torch.Tensor], vocab_size: int) -> None:
        self._future = future
        self._vocab_size = vocab_size

    def blocked(self, device: torch.device) -> torch.Tensor:
        """[rows, V] bool on `device`, True where the grammar forbids the token."""
        host = self._future.result()
        if host.dtype == torch.bool:  # already unpacked on the worker (CPU logits)
            return host if device.type == "cpu" else host.to(device)
        packed = host.to(device, non_blocking=True) if device.type == "cuda" else host
        return blocked_tokens(packed, self._vocab_size)

    def settle(self) -> None:
        """Wait for the fill to end, so matchers are never touched by two threads at once."""
        self._future.exception()


class StructuredOutputs:
    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        eos_token_ids: Sequence[int],
        device: torch.device,
        max_rows: int,
        overlap: bool = True,
    ) -> None:
        self.compiler = GrammarCompiler(tokenizer, vocab_size, eos_token_ids)
        self.vocab_size = vocab_size
        self.device = device
        self.overlap = overlap  # False fills the mask in line, for measuring what overlap saves
        self._matchers: dict[str, Any] = {}
        # Pinned so the copy to a GPU is asynchronous; reused because pinning costs a syscall.
        # A step's copy has finished before the next fill: sampling reads the tokens back.
        self._host = allocate_bitmask(max_rows, vocab_size, pin=device.type == "cuda")
        self._worker: ThreadPoolExecutor | None = None
        self._executor: Any = None  # llguidance.LLExecutor, made with the first matcher

    # -- requests ----------------------------------------------------------------------
    def new_matcher(self, grammar: Grammar) -> Any:
        """A fresh matcher for one sequence (the grammar compiled or reused).

        Raises GrammarError for a grammar that cannot be enforced. Separate from `attach` so a
        request is checked before it exists and gets its matcher once it is queued.
        """
        matcher = self.compiler.matcher(grammar)
        if self._executor is None:
            import llguidance

            self._executor = llguidance.LLExecutor()
        return matcher

    def attach(self, request_id: str, matcher: Any) -> None:
        self._matchers[request_id] = matcher

    def free(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)

    def has(self, request_id: str) -> bool:
        return request_id in self._matchers

    @property
    def num_active(self) -> int:
        return len(self._matchers)

    @property
    def active(self) -> bool:
        return bool(self._matchers)

    def request_ids(self) -> set[str]:
        return set(self._matchers)

    # -- the step ----------------------------------------------------------------------
    def begin_step(self, plan: SchedulePlan) -> PendingMask | None:
        """Start filling the mask for the plan's sampling rows; None when no row has a grammar."""
        rows = [chunk.request.request_id for chunk in plan.chunks if chunk.samples]
        pairs = [(self._matchers[rid], row) for row, rid in enumerate(rows) if rid in self._matchers]
        if not pairs:
            return None
        if len(rows) > self._host.shape[0]:
            self._host = allocate_bitmask(len(rows), self.vocab_size, pin=self.device.type == "cuda")
        host = self._host[: len(rows)]
        if not self.overlap:
            future: Future[torch.Tensor] = Future()
            future.set_result(self._fill(pairs, host))
            return PendingMask(future, self.vocab_size)
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-mask")
        return PendingMask(self._worker.submit(self._fill, pairs, host), self.vocab_size)

    def _fill(self, pairs: list[tuple[Any, int]], host: torch.Tensor) -> torch.Tensor:
        host.fill_(-1)  # rows without a grammar allow everything
        rows, words = host.shape
        self._executor.unsafe_compute_mask_ptr(pairs, host.data_ptr(), words * 4, rows)
        # CPU logits: unpack here too, off the main thread. A GPU unpacks on the device.
        return blocked_tokens(host, self.vocab_size) if self.device.type == "cpu" else host

    def advance(self, requests: Iterable[Request]) -> list[tuple[Request, FinishReason]]:
        """Feed each request's newest token to its matcher; who must finish now, and why.

        Finished requests' matchers are freed here; the caller finishes the returned ones.
        """
        ending: list[tuple[Request, FinishReason]] = []
        for request in requests:
            matcher = self._matchers.get(request.request_id)
            if matcher is None:
                continue
            if request.is_finished:
                del self._matchers[request.request_id]
                continue
            token_id = request.token_ids[-1]
            if not matcher.consume_token(token_id):
                # The mask allows only tokens the matcher accepts, so this is a bug, not the user's.
                log.error(
                    "request %s: token %d broke its grammar: %s",
                    request.request_id,
                    token_id,
                    matcher.get_error(),
                )
                ending.append((request, FinishReason.ABORT))
            elif matcher.is_stopped():
                ending.append((request, FinishReason.STOP))  # nothing can follow: the output is whole
            else:
                continue
            del self._matchers[request.request_id]
        return ending

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
