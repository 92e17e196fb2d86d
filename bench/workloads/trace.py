"""Replayable traces: one JSONL file, a header line then one request per line (msgspec Structs).

A prompt is stored as a recipe, not as token ids: a list of segments, each a (key, length)
pair that expands to `length` pseudo-random token ids drawn from a generator seeded by `key`.
Two prompts that share a system prompt, a tool schema or a document share that segment's
key, so their token ids (and hence their block hashes) are really equal; a 10,000-request
agent trace stays a few MB instead of hundreds. Expansion is a pure function of (key,
length, vocab size): a segment of length L is the first L tokens of the same key at any
longer length, so an answer cut short is a prefix of the full answer.

Arrivals are open loop or closed loop:
- `arrival_s` set: the request arrives at that time (seconds from the start of the trace);
- `after` set: it arrives `think_time_s` after the last of the listed requests finished
  (the next turn of a chat, an agent's step after its tool call, a parent agent resuming
  after its sub-agents). The replayer schedules it; the trace cannot know when that is.

The request's answer is `output_len` tokens; where a later request quotes the answer (a
chat's next turn, an agent's scratchpad), the answer's tokens are the expansion of
`output_key`, and the later prompt holds Segment(output_key, output_len), so the replica
that generated the answer has exactly those tokens cached.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

TRACE_FORMAT = "prefixgate-trace/1"
LLAMA3_VOCAB = 128256  # token ids are drawn below this by default (Llama 3's vocabulary)


class Segment(msgspec.Struct, array_like=True, frozen=True):
    """`length` token ids expanded from `key` (see the module docstring)."""

    key: int
    length: int


class TraceHeader(msgspec.Struct, tag="header", kw_only=True):
    format: str = TRACE_FORMAT
    workload: str
    seed: int
    vocab_size: int
    num_requests: int
    params: dict[str, Any] = {}


class TraceRequest(msgspec.Struct, tag="request", kw_only=True, omit_defaults=True):
    request_id: str
    prompt: list[Segment]
    output_len: int
    output_key: int
    session_id: str | None = None
    arrival_s: float | None = None
    after: list[str] = []
    think_time_s: float = 0.0

    @property
    def prompt_len(self) -> int:
        return sum(s.length for s in self.prompt)


TraceLine = TraceHeader | TraceRequest

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(TraceLine)


@dataclass(frozen=True)
class Trace:
    header: TraceHeader
    requests: tuple[TraceRequest, ...]

    def __post_init__(self) -> None:
        ids = [r.request_id for r in self.requests]
        known = set(ids)
        if len(known) != len(ids):
            raise ValueError("duplicate request ids in the trace")
        seen: set[str] = set()
        for request in self.requests:
            if (request.arrival_s is None) == (not request.after):
                raise ValueError(f"request {request.request_id}: give exactly one of arrival_s or after")
            if any(dep not in seen for dep in request.after):
                raise ValueError(f"request {request.request_id} follows a request not listed before it")
            if request.output_len < 1:
                raise ValueError(f"request {request.request_id}: output_len must be >= 1")
            seen.add(request.request_id)

    def write(self, path: str | Path) -> None:
        with open(path, "wb") as out:
            out.write(_encoder.encode(self.header) + b"\n")
            for request in self.requests:
                out.write(_encoder.encode(request) + b"\n")

    @classmethod
    def read(cls, path: str | Path) -> Trace:
        with open(path, "rb") as src:
            return cls.from_lines(src)

    @classmethod
    def from_lines(cls, lines: Iterable[bytes]) -> Trace:
        header: TraceHeader | None = None
        requests: list[TraceRequest] = []
        for line in lines:
            if not line.strip():
                continue
            item = _decoder.decode(line)
            if isinstance(item, TraceHeader):
                if header is not None:
                    raise ValueError("two trace headers")
                header = item
            else:
                requests.append(item)
        if header is None:
            raise ValueError("trace has no header line")
        if header.format != TRACE_FORMAT:
            raise ValueError(f"unknown trace format {header.format!r}")
        return cls(header, tuple(requests))

    def to_bytes(self) -> bytes:
        parts = [_encoder.encode(self.header)] + [_encoder.encode(r) for r in self.requests]
        return b"\n".join(parts) + b"\n"


@dataclass
class TokenBook:
    """Expands segments to token ids, remembering each key's longest expansion.

    Token ids avoid 0..reserved-1 so they never collide with a tokenizer's special tokens.
    """

    vocab_size: int
    reserved: int = 256
    _memo: dict[int, np.ndarray] = field(default_factory=dict)

    def segment(self, segment: Segment) -> np.ndarray:
        known = self._memo.get(segment.key)
        if known is None or len(known) < segment.length:
            rng = np.random.Generator(np.random.PCG64(segment.key & ((1 << 63) - 1)))
            known = rng.integers(
                self.reserved, self.vocab_size, size=max(segment.length, 16), dtype=np.uint32
            )
            self._memo[segment.key] = known
        return known[: segment.length]

    def tokens(self, segments: Sequence[Segment]) -> np.ndarray:
        if not segments:
            return np.zeros(0, dtype=np.uint32)
        return np.concatenate([self.segment(s) for s in segments])


class KeyMaker:
    """Unique segment keys for one trace: the seed in the high bits, a counter below."""

    def __init__(self, seed: int, stream: int = 0) -> None:
        self._base = ((seed & 0xFFFF_FFFF) << 28) | ((stream & 0xF) << 24)
        self._next = 0

    def __call__(self) -> int:
        self._next += 1
        if self._next >= 1 << 24:
            raise ValueError("too many segments for one key stream")
        return self._base | self._next


def poisson_arrivals(rng: np.random.Generator, rate: float, count: int, start: float = 0.0) -> list[float]:
    """`count` arrival times of a Poisson process of `rate` per second (all at `start` if rate is inf)."""
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    if np.isinf(rate):
        return [start] * count
    gaps = rng.exponential(1.0 / rate, size=count)
    return [float(t) for t in start + np.cumsum(gaps) - gaps[0]]


def lognormal_lengths(
    rng: np.random.Generator, mean: float, sigma: float, count: int, low: int, high: int
) -> list[int]:
    """Lengths with the given mean (not median) and log-space spread, clipped to [low, high]."""
    mu = np.log(mean) - sigma**2 / 2
    values = rng.lognormal(mu, sigma, size=count)
    return [int(v) for v in np.clip(np.round(values), low, high)]


def header_for(workload: str, config: object, num_requests: int) -> TraceHeader:
    """The header of a trace made by a generator from its frozen config dataclass."""
    params = {k: (str(v) if isinstance(v, float) and math.isinf(v) else v) for k, v in asdict(config).items()}  # type: ignore[call-overload]
    return TraceHeader(
        workload=workload,
        seed=params.pop("seed"),
        vocab_size=params.pop("vocab_size"),
        num_requests=num_requests,
        params=params,
    )
