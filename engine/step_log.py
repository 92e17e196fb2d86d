"""A record of every engine step, one JSON line each (`prefixgate engine --step-log FILE`).

What the step held (decode rows, the KV they read, prompt chunks over their cached context)
and how long it took, as the engine ran it: the data the routing simulator's latency model
(bench/simulator/latency.py) is checked against on real serving traffic, step by step, where
the offline scenarios it is fitted on show only averages. `python -m bench.step_fit FILE`
compares the two. Off by default: a record costs ~50-200 us of host time (the shared-block
count walks every decode's block table).
"""

from __future__ import annotations

import gzip
import time
from pathlib import Path
from typing import IO

import msgspec

from engine.step_shape import PlanShape


class StepRecord(msgspec.Struct, frozen=True):
    t: float  # wall clock (time.time()) at the step's end: runs are told apart by it
    step_s: float  # the whole step: schedule, forward, sampling, bookkeeping
    execute_s: float  # the runner's part: forward and sampling, up to the sampled ids on the host
    # How the runner ran it: "graph", "piecewise" or "eager"; logs from before piecewise graphs
    # (2026-11-29) also hold "split" (a decode graph, then a chunk graph).
    kind: str
    decodes: int  # one-token chunks (decode rows, and prompt chunks cut down to one token)
    decode_kv: int  # keys those rows attend to, summed over rows
    decode_kv_distinct: int  # the same, a KV block shared by several rows counted once
    chunks: list[tuple[int, int]]  # prompt chunks of 2+ tokens: (tokens, cached context before)


class StepLog:
    """Appends StepRecords to a file; lines are buffered and written every `flush_every` steps."""

    def __init__(self, path: str | Path, flush_every: int = 256) -> None:
        self.path = Path(path)
        self._file: IO[bytes] = self.path.open("ab")
        self._encoder = msgspec.json.Encoder()
        self._pending: list[bytes] = []
        self._flush_every = flush_every

    def record(self, shape: PlanShape, step_s: float, execute_s: float, kind: str) -> None:
        record = StepRecord(time.time(), step_s, execute_s, kind, *shape)
        self._pending.append(self._encoder.encode(record) + b"\n")
        if len(self._pending) >= self._flush_every:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self._file.write(b"".join(self._pending))
            self._pending.clear()
            self._file.flush()

    def close(self) -> None:
        self.flush()
        self._file.close()


def read_step_log(path: str | Path) -> list[StepRecord]:
    """A step log's records; a file named *.gz is read through gzip (how results are kept)."""
    path = Path(path)
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    decoder = msgspec.json.Decoder(StepRecord)
    return [decoder.decode(line) for line in data.splitlines() if line.strip()]
