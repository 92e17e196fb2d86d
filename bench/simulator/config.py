"""Simulator settings that the command line needs without importing the simulator (or torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

POLICIES: Final = ("kv_aware", "sglang_cache_aware", "round_robin", "least_load", "consistent_hash", "oracle")

# 0.85 of an H100 80GB's memory after Llama-3-8B's 16 GB of weights, at 128 KiB per token.
DEFAULT_NUM_BLOCKS = 24_000


@dataclass(frozen=True)
class StepRules:
    """Which steps the engine's runner replays from graphs (bench/simulator/step_cost.py).

    split_max_decodes: up to this many decodes beside one short chunk ran as a decode graph
    then a chunk graph (engines of 2026-11-27/28; 0: never). piecewise_max_tokens: steps of up
    to this many tokens run as piecewise graphs (engine/piecewise_graphs.py; 0: never).
    """

    split_max_decodes: int = 0
    piecewise_max_tokens: int = 0


# The engine since 2026-11-29: piecewise graphs up to its largest bucket (no two-replay split).
PIECEWISE_ENGINE: Final = StepRules(piecewise_max_tokens=2048)
# The engine of 2026-11-27/28: mixed steps of <= 64 decodes and a short chunk as two replays.
SPLIT_ENGINE: Final = StepRules(split_max_decodes=64)
# Before either: every mixed step eager.
EAGER_ENGINE: Final = StepRules()


@dataclass(frozen=True)
class ReplicaConfig:
    num_blocks: int = DEFAULT_NUM_BLOCKS
    block_size: int = 16
    max_num_seqs: int = 256
    max_batched_tokens: int = 8192
    model_id: str = "sim/llama3-8b"
    # How the engine runs steps that are not a decode batch or one short chunk: the current
    # engine's piecewise graphs, or an earlier engine's (for its step logs): StepRules.
    rules: StepRules = field(default_factory=lambda: PIECEWISE_ENGINE)
    max_segment_steps: int = 1 << 30  # for tests: 1 steps one at a time
