"""Workload generators: each a frozen config (with a seed) and a function to a replayable Trace."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from bench.workloads.agent import AgentConfig, generate_agent
from bench.workloads.multi_turn import MultiTurnConfig, generate_multi_turn
from bench.workloads.rag import RagConfig, generate_rag
from bench.workloads.shared_prefix import (
    RandomLengthsConfig,
    SharedPrefixConfig,
    generate_random_lengths,
    generate_shared_prefix,
)
from bench.workloads.trace import Segment, TokenBook, Trace, TraceHeader, TraceRequest

WORKLOADS: Final[dict[str, tuple[type, Callable[[Any], Trace]]]] = {
    "generated-shared-prefix": (SharedPrefixConfig, generate_shared_prefix),
    "multi-turn": (MultiTurnConfig, generate_multi_turn),
    "agent": (AgentConfig, generate_agent),
    "rag": (RagConfig, generate_rag),
    "random": (RandomLengthsConfig, generate_random_lengths),
}


def generate(workload: str, **options: Any) -> Trace:
    """A trace of `workload` built with `options` (its config's fields, e.g. seed=3)."""
    try:
        config_class, generator = WORKLOADS[workload]
    except KeyError:
        raise ValueError(f"unknown workload {workload!r} (known: {sorted(WORKLOADS)})") from None
    try:
        config = config_class(**options)
    except TypeError as exc:
        raise ValueError(f"bad options for workload {workload!r}: {exc}") from None
    return generator(config)


__all__ = [
    "WORKLOADS",
    "AgentConfig",
    "MultiTurnConfig",
    "RagConfig",
    "RandomLengthsConfig",
    "Segment",
    "SharedPrefixConfig",
    "TokenBook",
    "Trace",
    "TraceHeader",
    "TraceRequest",
    "generate",
]
