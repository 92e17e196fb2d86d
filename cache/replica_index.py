"""Per-replica prefix indexes: which blocks one replica holds, keyed by chained block hashes.

A request's block hashes (cache/hashing) name its prefix block by block, and because each
hash folds in its parent, a cached block with hash i holds KV computed for exactly this
request's tokens up to block i (same model, same salt). So "how much of this prompt is
cached on replica r" is: how many leading hashes of the request r holds, stopping at the
first miss. No token comparison is needed.

Two per-replica indexes answer that question:

- `ReplicaPrefixIndex` (exact): a replica of our own engine publishes KV events; applying
  them in sequence order keeps an exact copy of its cached hash set.
- `ApproximatePrefixIndex` (guessed): a foreign backend (vLLM, SGLang, ...) publishes nothing,
  so we remember what we sent it, for a while (a TTL), and assume it still caches that.

`PrefixIndex` (cache/prefix_index.py) holds one per replica and matches a request against all
of them in one pass.

Neither index reads a clock: time is an argument (`now`, seconds on the caller's monotonic
clock), so the gateway and the routing simulator drive them the same way.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from typing import Final, Protocol

from cache.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

# 2**18 blocks is ~4M tokens at block size 16: several times what one H100 caches for an 8B
# model (~25k blocks), so a well-configured replica never reaches it; it bounds the damage of
# a misbehaving one (~20 MB of Python ints per replica at the limit).
DEFAULT_MAX_BLOCKS: Final[int] = 1 << 18
DEFAULT_TTL_S: Final[float] = 120.0


class HashListener(Protocol):
    """Told of every hash that enters or leaves an index, so a cross-replica map stays in step."""

    def added(self, hashes: Sequence[int]) -> None: ...

    def removed(self, hashes: Sequence[int]) -> None: ...


class ApplyOutcome(enum.Enum):
    APPLIED = "applied"  # the next event in sequence
    STALE = "stale"  # at or before what the index already reflects: ignored
    GAP = "gap"  # events were lost before this one: applied anyway, and needs_resync is set


def _leading_matches(held: set[int] | OrderedDict[int, float], request_hashes: Sequence[int]) -> int:
    matched = 0
    for h in request_hashes:
        if h not in held:
            break
        matched += 1
    return matched


class ReplicaPrefixIndex:
    """The exact set of block hashes one replica caches, kept by applying its KV events.

    Sequence numbers: a stream starts from `load_snapshot(hashes, seq)` (or from an empty
    cache at seq 0) and events must follow as seq + 1, seq + 2, ... A jump means events were
    lost: `apply` still applies the event (it is true information) but returns GAP and sets
    `needs_resync` until the caller loads a fresh snapshot. Meanwhile answers may be off in
    either direction: a lost store under-reports, a lost removal over-reports (the request
    then simply pays a prefill it hoped to skip). AllBlocksCleared also ends a resync: after
    it the replica's cache is known to be empty, whatever was lost before.

    Bounded memory: at most `max_blocks` hashes. A store past the limit records only what
    fits and counts the rest in `overflowed_blocks`. We drop the newest rather than the
    oldest on purpose: the oldest entries are the roots of long-lived chains (a hot system
    prompt is stored once and never again), and dropping a root cuts every match through
    it, while dropping new blocks only shortens matches of new content. Either way the
    index then holds a subset of the truth, so it under-reports and never claims a block
    the replica lacks. Removals free room for later stores. A correctly synced replica never
    holds more blocks than its GPU cache, so reaching the limit means the limit is set too
    low or removals were lost; both show in the counters.

    A stored run whose parent block is not held is skipped too (counted in
    `orphaned_blocks`): no request can match past the missing parent, so the run would only
    take room. An in-sync replica never sends one, since its radix tree evicts leaves only.

    Only events for `medium` count: a block offloaded to CPU and later removed from there
    must not erase the GPU copy.
    """

    def __init__(
        self,
        max_blocks: int = DEFAULT_MAX_BLOCKS,
        medium: str = "GPU",
        listener: HashListener | None = None,
    ) -> None:
        if max_blocks <= 0:
            raise ValueError(f"max_blocks must be positive, got {max_blocks}")
        self._max_blocks = max_blocks
        self._medium = medium
        self._listener = listener
        self._hashes: set[int] = set()
        self._last_seq = 0
        self._needs_resync = False
        self._overflowed = 0
        self._orphaned = 0

    # ---- state -----------------------------------------------------------------------

    @property
    def max_blocks(self) -> int:
        return self._max_blocks

    @property
    def last_seq(self) -> int:
        """Sequence number of the last event (or snapshot) reflected; 0 at start."""
        return self._last_seq

    @property
    def needs_resync(self) -> bool:
        """True after a gap in sequence numbers, until a snapshot or AllBlocksCleared."""
        return self._needs_resync

    @property
    def overflowed_blocks(self) -> int:
        """Blocks not recorded because the index was full (see the class docstring)."""
        return self._overflowed

    @property
    def orphaned_blocks(self) -> int:
        """Blocks not recorded because their parent block was not held."""
        return self._orphaned

    def __len__(self) -> int:
        return len(self._hashes)

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self._hashes

    def __iter__(self) -> Iterator[int]:
        return iter(self._hashes)

    # ---- updates ---------------------------------------------------------------------

    def apply(self, seq: int, event: KVEvent) -> ApplyOutcome:
        """Apply one event stamped with sequence number `seq`."""
        if seq <= self._last_seq:
            return ApplyOutcome.STALE
        outcome = ApplyOutcome.APPLIED if seq == self._last_seq + 1 else ApplyOutcome.GAP
        self._last_seq = seq
        if outcome is ApplyOutcome.GAP:
            self._needs_resync = True
        if isinstance(event, BlockStored):
            if event.medium == self._medium:
                self._store(event.block_hashes, event.parent_block_hash)
        elif isinstance(event, BlockRemoved):
            if event.medium == self._medium:
                self._remove(event.block_hashes)
        elif isinstance(event, AllBlocksCleared):
            self._clear()
            self._needs_resync = False
        else:
            raise TypeError(f"not a KV event: {event!r}")
        return outcome

    def note_heartbeat(self, seq: int) -> bool:
        """A heartbeat names the last event sent; if we have not seen it, some were lost.

        Returns `needs_resync`.
        """
        if seq > self._last_seq:
            self._needs_resync = True
        return self._needs_resync

    def load_snapshot(self, hashes: Iterable[int], seq: int) -> None:
        """Replace the contents with a snapshot taken right after event `seq`.

        A snapshot is a flat set, so past `max_blocks` there is no telling roots from leaves:
        the first `max_blocks` in iteration order are kept and the rest counted as overflow.
        """
        if seq < 0:
            raise ValueError(f"seq must be >= 0, got {seq}")
        new: set[int] = set()
        for h in hashes:
            if len(new) < self._max_blocks:
                new.add(h)
            elif h not in new:
                self._overflowed += 1
        old = self._hashes
        self._hashes = new
        self._last_seq = seq
        self._needs_resync = False
        if self._listener is not None:
            # Only the difference: a periodic resync of an unchanged cache costs the shared
            # map nothing.
            self._listener.removed([h for h in old if h not in new])
            self._listener.added([h for h in new if h not in old])

    def _store(self, block_hashes: Sequence[int], parent: int | None) -> None:
        if parent is not None and parent not in self._hashes:
            self._orphaned += len(block_hashes)
            return
        added: list[int] = []
        for h in block_hashes:
            if h in self._hashes:
                continue
            if len(self._hashes) >= self._max_blocks:
                self._overflowed += 1
                continue
            self._hashes.add(h)
            added.append(h)
        if added and self._listener is not None:
            self._listener.added(added)

    def _remove(self, block_hashes: Sequence[int]) -> None:
        removed = [h for h in block_hashes if h in self._hashes]
        self._hashes.difference_update(removed)
        if removed and self._listener is not None:
            self._listener.removed(removed)

    def _clear(self) -> None:
        removed = list(self._hashes)
        self._hashes.clear()
        if removed and self._listener is not None:
            self._listener.removed(removed)

    # ---- queries ---------------------------------------------------------------------

    def matched_blocks(self, request_hashes: Sequence[int]) -> int:
        """How many leading blocks of the request this replica holds."""
        return _leading_matches(self._hashes, request_hashes)


class ApproximatePrefixIndex:
    """What we routed to a replica that publishes no KV events, assumed cached for `ttl_s`.

    Each recorded hash expires `ttl_s` after the last request that carried it was routed
    here. The TTL stands in for the backend's own eviction, which we cannot see: set it
    near how long that backend keeps an idle prefix. At most `max_entries` hashes are kept;
    beyond that the least recently recorded go first.

    A request's hashes are recorded deepest first, so within one request the root ends up
    most recent. Together with a clock that never goes back, that keeps the held set
    prefix-closed: any request recording block i also recorded blocks 0..i-1, at least as
    recently, so they expire and are dropped no earlier. Dropping leaves before roots is also
    what the backend's LRU cache does.

    Time never goes backwards inside the index: a `now` earlier than one already seen is
    treated as the latest seen, so recency order and expiry order stay the same order and
    `expire` can stop at the first live entry.
    """

    def __init__(
        self,
        ttl_s: float = DEFAULT_TTL_S,
        max_entries: int = DEFAULT_MAX_BLOCKS,
        listener: HashListener | None = None,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        if max_entries <= 0:
            raise ValueError(f"max_entries must be positive, got {max_entries}")
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._listener = listener
        # hash -> expiry time, least recently recorded first.
        self._expiry: OrderedDict[int, float] = OrderedDict()
        self._now = float("-inf")

    @property
    def ttl_s(self) -> float:
        return self._ttl_s

    @property
    def max_entries(self) -> int:
        return self._max_entries

    def __len__(self) -> int:
        return len(self._expiry)

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self._expiry

    def __iter__(self) -> Iterator[int]:
        return iter(self._expiry)

    def _advance(self, now: float) -> float:
        if now > self._now:
            self._now = now
        return self._now

    def record(self, request_hashes: Sequence[int], now: float) -> None:
        """Remember that a request with these block hashes was routed here at `now`."""
        now = self._advance(now)
        self.expire(now)
        expiry = now + self._ttl_s
        added: list[int] = []
        for h in reversed(request_hashes):
            if h in self._expiry:
                self._expiry.move_to_end(h)
            else:
                added.append(h)
            self._expiry[h] = expiry
        dropped: list[int] = []
        while len(self._expiry) > self._max_entries:
            h, _ = self._expiry.popitem(last=False)
            dropped.append(h)
        if self._listener is not None:
            # A hash added and dropped by this same call never reached the listener's map.
            fresh, gone = set(added), set(dropped)
            self._listener.added([h for h in added if h not in gone])
            self._listener.removed([h for h in dropped if h not in fresh])

    def expire(self, now: float) -> int:
        """Forget every entry whose TTL ran out by `now`; return how many went."""
        now = self._advance(now)
        expired: list[int] = []
        while self._expiry:
            h, expiry = next(iter(self._expiry.items()))
            if expiry > now:
                break
            self._expiry.popitem(last=False)
            expired.append(h)
        if expired and self._listener is not None:
            self._listener.removed(expired)
        return len(expired)

    def matched_blocks(self, request_hashes: Sequence[int], now: float) -> int:
        """How many leading blocks of the request were routed here and have not expired.

        Expires what ran out first, so asking advances the index's clock to `now`.
        """
        self.expire(now)
        return _leading_matches(self._expiry, request_hashes)
