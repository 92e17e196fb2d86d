"""A request owns its cache state: tokens, block table and counters (nano-vllm's rule).

Chunked prefill, decode and recompute after preemption are then the same thing: each step
computes some of the tokens in [num_computed_tokens, len(token_ids)), and a step that
reaches the end samples the next token.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from cache.radix_tree import Node


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(slots=True)
class RequestTimes:
    arrival: float = field(default_factory=time.perf_counter)
    first_scheduled: float | None = None
    prefill_chunks: int = 0  # steps that ran part of the prompt (tracing)
    first_token: float | None = None
    finished: float | None = None
    tokens: list[float] = field(default_factory=list)

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled is None else self.first_scheduled - self.arrival

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival


@dataclass(eq=False, slots=True)
class Request:
    request_id: str
    token_ids: list[int]  # the prompt, then every sampled token
    num_prompt_tokens: int
    params: SamplingParams
    arrival_seq: int
    cache_salt: str | None = None
    eos_token_ids: frozenset[int] = frozenset()
    max_total_tokens: int = 1 << 30  # the context limit this request may grow to
    # Cache state, changed only by the scheduler and its KV cache manager.
    status: RequestStatus = RequestStatus.WAITING
    block_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit at first admission; -1 until admitted
    block_hashes: list[int] = field(default_factory=list)  # of full blocks, grown lazily
    tree_node: Node | None = None  # deepest radix node this request holds locked
    num_tree_blocks: int = 0  # leading entries of block_ids that belong to the radix tree
    num_preemptions: int = 0
    # Overlapped steps: tokens sampled on the device whose values the host has not read yet.
    # They count in num_tokens (the scheduler plans around them) but are not in token_ids;
    # the step that decodes one reads it from the device (`future_slot`) as its input.
    num_pending_tokens: int = 0
    future_slot: int = -1
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    generator: torch.Generator | None = None
    times: RequestTimes = field(default_factory=RequestTimes)
    # The prompt's ids as u32le bytes (validation packs them): its block hashes read these.
    packed_prompt: bytes = b""

    @property
    def num_tokens(self) -> int:
        """Tokens the request has, sampled ones the host has not read yet included."""
        return len(self.token_ids) + self.num_pending_tokens

    @property
    def num_output_tokens(self) -> int:
        """Output tokens the host knows (pending ones excluded)."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def length_exhausted(self) -> bool:
        """Pending tokens already reach max_tokens or the context limit: the request ends
        when they are read, whatever their values, so it must not be scheduled again."""
        total = self.num_tokens
        return total - self.num_prompt_tokens >= self.params.max_tokens or total >= self.max_total_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def num_remaining_tokens(self) -> int:
        """Tokens still to run through the model before the next token can be sampled."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_token(self, token_id: int, logprob: TokenLogprob | None, now: float) -> None:
        """The host read the oldest pending token's value."""
        assert self.num_pending_tokens > 0, "a token nobody sampled"
        self.num_pending_tokens -= 1
        self.token_ids.append(token_id)
        if logprob is not None:
            self.logprobs.append(logprob)
        if self.times.first_token is None:
            self.times.first_token = now
        self.times.tokens.append(now)

    def stop_by_token(self, token_id: int) -> FinishReason | None:
        """Whether the token just appended ends the request (stop strings are checked elsewhere)."""
        if not self.params.ignore_eos and token_id in self.eos_token_ids:
            self.stop_reason = token_id
            return FinishReason.STOP
        if token_id in self.params.stop_token_ids:
            self.stop_reason = token_id
            return FinishReason.STOP
        known = len(self.token_ids)
        if known - self.num_prompt_tokens >= self.params.max_tokens or known >= self.max_total_tokens:
            return FinishReason.LENGTH
        return None
