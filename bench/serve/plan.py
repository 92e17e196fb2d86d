"""A trace -> the requests to send: prompts, output lengths, sessions, and when each goes.

Arrivals at a given rate follow vLLM's `get_request`: gaps drawn from a gamma distribution of
shape `burstiness` and mean 1 / rate (burstiness 1 is a Poisson process, < 1 burstier, > 1
more even), accumulated, then scaled so that the last request goes at n / rate (vLLM does this
to make throughput comparable across seeds). An infinite rate sends everything at once.

Without a rate the trace's own schedule is kept: `arrival_s`, or, for a request that follows
others (a chat's next turn, an agent's next step), its think time after the last of them ends.
With a rate the drawn times replace both, but a request that follows others still never goes
before they have finished: a session's turns stay in order.

Prompts are the trace's token-id recipes, sent as token ids to /v1/completions; ids drawn
from a larger vocabulary than the model's are folded into it (equal ids stay equal, so shared
prefixes stay shared). For /v1/chat/completions each segment is decoded to text with the
model's tokenizer and the texts joined into one user message.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.workloads.trace import Segment, TokenBook, Trace

RESERVED_IDS = TokenBook.reserved  # trace token ids avoid 0..RESERVED_IDS-1 (special tokens)
_KEY_MASK = (1 << 63) - 1


@dataclass(frozen=True)
class PlannedRequest:
    request_id: str
    session_id: str | None
    prompt: tuple[Segment, ...]  # built into ids or text only when sent (see Plan.prompt)
    prompt_len: int
    max_tokens: int
    arrival_s: float | None  # None: goes when `after` have finished (+ think time)
    after: tuple[str, ...]
    think_time_s: float


def arrival_times(count: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times (s from the start) of `count` requests at `rate` per second, vLLM's way."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if not rate > 0:
        raise ValueError(f"request rate must be positive, got {rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be positive, got {burstiness}")
    if count == 0:
        return []
    if math.isinf(rate):
        return [0.0] * count
    if math.isinf(burstiness):
        gaps = np.full(count, 1.0 / rate)
    else:
        rng = np.random.default_rng(seed)
        gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=count)
    times = np.cumsum(gaps)
    times *= (count / rate) / times[-1]
    return [float(t) for t in times]


def default_tokenizer_folder() -> Path | None:
    """The embedded model's folder, if it was fetched already (no download from here).

    The path engine/model_store.py writes; not imported from there, as the engine package
    pulls in torch, which a load driver has no need of."""
    home = Path(os.environ.get("PREFIXGATE_HOME") or Path.home() / ".cache" / "prefixgate")
    folder = home / "models" / "SmolLM2-135M-Instruct"
    return folder if (folder / "tokenizer.json").exists() else None


def load_tokenizer(folder: str | Path | None) -> Any | None:
    """A `tokenizers.Tokenizer` from a model folder (or the embedded model's), or None."""
    from tokenizers import Tokenizer

    path = Path(folder) if folder is not None else default_tokenizer_folder()
    if path is None:
        return None
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.exists():
        raise ValueError(f"no tokenizer.json at {path}")
    return Tokenizer.from_file(str(file))


class PromptMaker:
    """Token ids (folded into `vocab_size`) or text for trace segments, memoized per segment."""

    def __init__(self, trace_vocab: int, vocab_size: int, tokenizer: Any | None, key_salt: int = 0) -> None:
        if vocab_size <= RESERVED_IDS:
            raise ValueError(f"vocab size {vocab_size} is too small (ids below {RESERVED_IDS} are reserved)")
        self._book = TokenBook(trace_vocab)
        self._vocab = vocab_size
        self._fold = trace_vocab > vocab_size
        self._tokenizer = tokenizer
        # A salted key gives other token ids with the same sharing structure: a sweep's later
        # runs then find none of the earlier runs' prefixes in the caches.
        self._salt = (key_salt * 0x9E3779B97F4A7C15) & _KEY_MASK
        self._texts: dict[Segment, str] = {}

    def _ids(self, segment: Segment) -> np.ndarray:
        ids = self._book.segment(Segment((segment.key ^ self._salt) & _KEY_MASK, segment.length))
        if self._fold:
            ids = RESERVED_IDS + (ids.astype(np.int64) - RESERVED_IDS) % (self._vocab - RESERVED_IDS)
        return ids

    def ids(self, segments: Sequence[Segment]) -> list[int]:
        if not segments:
            return []
        return np.concatenate([self._ids(s) for s in segments]).tolist()

    def text(self, segments: Sequence[Segment]) -> str:
        if self._tokenizer is None:
            raise ValueError("the chat endpoint needs a tokenizer (--tokenizer FOLDER) to turn ids into text")
        parts = []
        for segment in segments:
            known = self._texts.get(segment)
            if known is None:
                ids = [int(t) for t in self._ids(segment)]
                known = self._texts[segment] = self._tokenizer.decode(ids, skip_special_tokens=True)
            parts.append(known)
        return "".join(parts)


@dataclass(frozen=True)
class Plan:
    """The requests in trace order; prompts are built per request when it is sent, so a
    10,000-request trace of long prompts does not hold every prompt in memory at once."""

    endpoint: str
    requests: list[PlannedRequest]
    prompts: PromptMaker

    def prompt(self, request: PlannedRequest) -> list[int] | str:
        """Token ids for /v1/completions, text for /v1/chat/completions."""
        if self.endpoint == "chat":
            return self.prompts.text(request.prompt)
        return self.prompts.ids(request.prompt)


def plan_requests(
    trace: Trace,
    *,
    endpoint: str,
    vocab_size: int | None,
    tokenizer: Any | None,
    request_rate: float | None,
    burstiness: float = 1.0,
    seed: int = 0,
    max_output_len: int | None = None,
    key_salt: int = 0,
) -> Plan:
    """What to send for `trace`, and when (see the module docstring)."""
    if endpoint not in ("completions", "chat"):
        raise ValueError(f"endpoint must be 'completions' or 'chat', got {endpoint!r}")
    if endpoint == "chat" and tokenizer is None:
        raise ValueError("the chat endpoint needs a tokenizer (--tokenizer FOLDER) to turn ids into text")
    if max_output_len is not None and max_output_len < 1:
        raise ValueError(f"max output length must be >= 1, got {max_output_len}")
    vocab = vocab_size or (tokenizer.get_vocab_size() if tokenizer is not None else trace.header.vocab_size)
    maker = PromptMaker(trace.header.vocab_size, vocab, tokenizer, key_salt)
    times = (
        arrival_times(len(trace.requests), request_rate, burstiness, seed)
        if request_rate is not None
        else None
    )
    planned = []
    for n, request in enumerate(trace.requests):
        if times is not None:
            arrival: float | None = times[n]
            think = 0.0
        else:
            arrival, think = request.arrival_s, request.think_time_s
        planned.append(
            PlannedRequest(
                request_id=request.request_id,
                session_id=request.session_id,
                prompt=tuple(request.prompt),
                prompt_len=request.prompt_len,
                max_tokens=min(request.output_len, max_output_len or request.output_len),
                arrival_s=arrival,
                after=tuple(request.after),
                think_time_s=think,
            )
        )
    return Plan(endpoint, planned, maker)
