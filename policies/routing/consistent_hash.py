"""consistent_hash: a hash ring keyed on the session or the prompt's first blocks. A baseline.

Requests with the same key always land on the same replica while it stays healthy, which
gives cache affinity without any index; it ignores load, so a hot key makes a hot replica.
When a replica joins, only the keys it now owns move (about 1/N of them); when one leaves,
only its own keys move. The points are blake2b digests (stdlib, fixed across processes),
never Python's salted hash().
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence
from typing import ClassVar, Final

from policies.routing.base import (
    ReplicaSnapshot,
    RoutingDecision,
    RoutingRequest,
    eligible_replicas,
    least_loaded,
)

_RING: Final[int] = 1 << 64
_U64: Final[int] = _RING - 1


def _point(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class ConsistentHashRouting:
    """The replica owning the first ring point clockwise of the request's key.

    Key: the session id when given (a conversation sticks to one replica), otherwise the
    first `prefix_blocks` block hashes (16 blocks = 256 tokens at block size 16: enough to
    tell system prompts and documents apart, short enough that turns of one conversation
    share it). A request without a full block and without a session has nothing worth
    being sticky about and goes to the least loaded replica (reason "load_balance").

    Each replica owns `virtual_nodes` points, which evens out its share of the ring. The
    winner is found per replica (its nearest point clockwise of the key) rather than on one
    merged ring: same answer, and it makes the stability plain, since adding a replica
    changes no other replica's distance. Scores: each replica's clockwise distance from the
    key as a fraction of the ring (lowest wins).
    """

    name: ClassVar[str] = "consistent_hash"

    def __init__(self, virtual_nodes: int = 128, prefix_blocks: int = 16) -> None:
        if virtual_nodes <= 0:
            raise ValueError(f"virtual_nodes must be positive, got {virtual_nodes}")
        if prefix_blocks <= 0:
            raise ValueError(f"prefix_blocks must be positive, got {prefix_blocks}")
        self.virtual_nodes = virtual_nodes
        self.prefix_blocks = prefix_blocks
        # A memo of each replica's sorted points: a pure function of its id, kept for the
        # replicas of the latest call only, so it never outgrows the fleet.
        self._points: dict[str, list[int]] = {}

    def key(self, request: RoutingRequest) -> bytes | None:
        if request.session_id is not None:
            return b"s" + request.session_id.encode("utf-8")
        hashes = request.first_block_hashes[: self.prefix_blocks]
        if not hashes:
            return None
        return b"p" + b"".join((h & _U64).to_bytes(8, "little") for h in hashes)

    def _replica_points(self, replica_ids: Sequence[str]) -> list[list[int]]:
        if set(replica_ids) != set(self._points):
            self._points = {
                rid: self._points.get(rid)
                or sorted(_point(f"{rid}#{i}".encode()) for i in range(self.virtual_nodes))
                for rid in replica_ids
            }
        return [self._points[rid] for rid in replica_ids]

    def choose(self, request: RoutingRequest, replicas: Sequence[ReplicaSnapshot]) -> RoutingDecision:
        eligible = eligible_replicas(replicas)
        key = self.key(request)
        if key is None:
            chosen = least_loaded(eligible)
            return RoutingDecision(
                replica_id=chosen.replica_id,
                reason="load_balance",
                predicted_cached_tokens=request.cached_tokens(chosen.replica_id),
                scores=tuple((r.replica_id, float(r.in_flight)) for r in eligible),
            )
        position = _point(key)
        ids = [r.replica_id for r in eligible]
        distances: list[tuple[int, str]] = []
        for rid, points in zip(ids, self._replica_points(ids), strict=True):
            i = bisect.bisect_left(points, position)
            nearest = points[i] if i < len(points) else points[0] + _RING  # wrap around the ring
            distances.append((nearest - position, rid))
        _, chosen_id = min(distances)
        return RoutingDecision(
            replica_id=chosen_id,
            reason="session" if request.session_id is not None else "hash",
            predicted_cached_tokens=request.cached_tokens(chosen_id),
            scores=tuple((rid, distance / _RING) for distance, rid in distances),
        )
