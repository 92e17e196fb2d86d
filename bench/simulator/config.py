"""Simulator settings that the command line needs without importing the simulator (or torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

POLICIES: Final = ("kv_aware", "sglang_cache_aware", "round_robin", "least_load", "consistent_hash", "oracle")

# 0.85 of an H100 80GB's memory after Llama-3-8B's 16 GB of weights, at 128 KiB per token.
DEFAULT_NUM_BLOCKS = 24_000


@dataclass(frozen=True)
class ReplicaConfig:
    num_blocks: int = DEFAULT_NUM_BLOCKS
    block_size: int = 16
    max_num_seqs: int = 256
    max_batched_tokens: int = 8192
    model_id: str = "sim/llama3-8b"
    # engine/runner.py's SPLIT_MAX_DECODES (kept here so the command line needs no torch); 0
    # models the engine before it split mixed steps into two graph replays.
    split_max_decodes: int = 64
    max_segment_steps: int = 1 << 30  # for tests: 1 steps one at a time
