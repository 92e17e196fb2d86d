"""Which waiting request the scheduler considers first. Pure functions over snapshots."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class WaitingRequest:
    arrival_seq: int  # order of arrival; a preempted request keeps its original number
    num_tokens: int
    num_cached_tokens: int  # the prefix the cache holds now (0 unless the policy asks for it)


class QueuePolicy(Protocol):
    name: str
    # Whether the scheduler must look up each waiting request's cached prefix for this policy.
    needs_prefix_match: bool

    def order(self, waiting: Sequence[WaitingRequest]) -> list[int]:
        """Indices into `waiting`, first to consider first."""
        ...


class FirstComeFirstServed:
    name = "fcfs"
    needs_prefix_match = False

    def order(self, waiting: Sequence[WaitingRequest]) -> list[int]:
        return sorted(range(len(waiting)), key=lambda i: waiting[i].arrival_seq)


class LongestPrefixMatchFirst:
    """SGLang's `lpm`: requests with the most cached tokens first, so the hot prefix stays hot.

    It can starve a request that shares nothing while others keep hitting; FCFS breaks ties.
    """

    name = "lpm"
    needs_prefix_match = True

    def order(self, waiting: Sequence[WaitingRequest]) -> list[int]:
        return sorted(
            range(len(waiting)), key=lambda i: (-waiting[i].num_cached_tokens, waiting[i].arrival_seq)
        )


QUEUE_POLICIES: dict[str, type[FirstComeFirstServed] | type[LongestPrefixMatchFirst]] = {
    "fcfs": FirstComeFirstServed,
    "lpm": LongestPrefixMatchFirst,
}


def queue_policy(name: str) -> QueuePolicy:
    try:
        return QUEUE_POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown queue policy {name!r} (known: {sorted(QUEUE_POLICIES)})") from None
