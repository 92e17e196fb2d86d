"""What one engine step holds, as the step log (engine/step_log.py) records it.

Kept apart from the log itself, which writes msgspec records: the engine core imports this
module and must run without the web stack's libraries (a GPU machine may lack them).
"""

from __future__ import annotations

from typing import NamedTuple

from engine.scheduler import SchedulePlan


class PlanShape(NamedTuple):
    decodes: int
    decode_kv: int
    decode_kv_distinct: int
    chunks: list[tuple[int, int]]


def describe_plan(plan: SchedulePlan, block_size: int) -> PlanShape:
    """What a plan holds, as StepRecord keeps it; taken before the step runs (a request that
    finishes in it gives its blocks back)."""
    decodes = decode_kv = 0
    blocks: set[int] = set()
    partial = 0  # keys in rows' last, partly filled blocks (not shared: counted per row)
    chunks: list[tuple[int, int]] = []
    for chunk in plan.chunks:
        if chunk.num_tokens > 1:
            chunks.append((chunk.num_tokens, chunk.start))
            continue
        keys = chunk.start + 1
        decodes += 1
        decode_kv += keys
        full = keys // block_size
        blocks.update(chunk.request.block_ids[:full])
        partial += keys - full * block_size
    return PlanShape(decodes, decode_kv, len(blocks) * block_size + partial, chunks)
