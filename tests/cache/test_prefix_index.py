"""Per-replica prefix indexes: the exact one fed by KV events, the approximate one with a TTL."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cache.block_pool import BlockPool
from cache.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent, KVEventQueue
from cache.hashing import BlockHasher
from cache.prefix_index import ApplyOutcome, ApproximatePrefixIndex, ReplicaPrefixIndex
from cache.radix_tree import RadixCache

BLOCK = 2
HASHER = BlockHasher("test-model", BLOCK)


def stored(hashes: Sequence[int], parent: int | None = None, medium: str = "GPU") -> BlockStored:
    return BlockStored(
        block_hashes=tuple(hashes),
        parent_block_hash=parent,
        token_ids=tuple(range(len(hashes) * BLOCK)),
        block_size=BLOCK,
        medium=medium,
    )


class RecordingListener:
    def __init__(self) -> None:
        self.held: set[int] = set()

    def added(self, hashes: Sequence[int]) -> None:
        assert not self.held.intersection(hashes), "told twice about the same hash"
        self.held.update(hashes)

    def removed(self, hashes: Sequence[int]) -> None:
        assert self.held.issuperset(hashes), "told of a removal it never saw added"
        self.held.difference_update(hashes)


# ---- ReplicaPrefixIndex ------------------------------------------------------------------


def test_events_in_order_keep_the_exact_set() -> None:
    index = ReplicaPrefixIndex()
    assert index.apply(1, stored([10, 11, 12])) is ApplyOutcome.APPLIED
    assert index.apply(2, stored([13], parent=11)) is ApplyOutcome.APPLIED
    assert len(index) == 4 and 13 in index
    assert index.matched_blocks([10, 11, 12, 99]) == 3
    assert index.matched_blocks([10, 11, 13]) == 3
    assert index.apply(3, BlockRemoved((12,))) is ApplyOutcome.APPLIED
    assert index.matched_blocks([10, 11, 12]) == 2
    assert index.apply(4, AllBlocksCleared()) is ApplyOutcome.APPLIED
    assert len(index) == 0
    assert index.last_seq == 4
    assert not index.needs_resync


def test_matching_stops_at_the_first_miss() -> None:
    index = ReplicaPrefixIndex()
    index.load_snapshot([1, 2, 4], seq=0)
    # Holding block 4 says nothing about a request whose block 2 differs (hash 3).
    assert index.matched_blocks([1, 2, 3, 4]) == 2
    assert index.matched_blocks([5, 1, 2]) == 0
    assert index.matched_blocks([]) == 0


def test_gap_is_reported_and_resync_clears_it() -> None:
    index = ReplicaPrefixIndex()
    index.apply(1, stored([1]))
    assert index.apply(3, stored([2], parent=1)) is ApplyOutcome.GAP
    assert index.needs_resync
    # Applied anyway: it is true information about the replica.
    assert 2 in index
    assert index.apply(4, BlockRemoved((1,))) is ApplyOutcome.APPLIED
    assert index.needs_resync, "a later in-order event does not make up for the lost one"
    index.load_snapshot([7, 8], seq=10)
    assert not index.needs_resync
    assert set(index) == {7, 8}
    assert index.last_seq == 10


def test_events_covered_by_the_snapshot_are_stale() -> None:
    index = ReplicaPrefixIndex()
    index.load_snapshot([1, 2], seq=5)
    assert index.apply(5, BlockRemoved((1,))) is ApplyOutcome.STALE
    assert index.apply(4, AllBlocksCleared()) is ApplyOutcome.STALE
    assert set(index) == {1, 2}
    assert index.apply(6, stored([3], parent=2)) is ApplyOutcome.APPLIED


def test_all_blocks_cleared_ends_a_resync() -> None:
    index = ReplicaPrefixIndex()
    index.apply(2, stored([1]))
    assert index.needs_resync
    index.apply(3, AllBlocksCleared())
    assert not index.needs_resync
    assert len(index) == 0


def test_heartbeat_ahead_of_us_means_lost_events() -> None:
    index = ReplicaPrefixIndex()
    index.apply(1, stored([1]))
    assert not index.note_heartbeat(1)
    assert index.note_heartbeat(2)
    assert index.needs_resync


def test_other_media_are_ignored_but_consume_sequence_numbers() -> None:
    index = ReplicaPrefixIndex()
    index.apply(1, stored([1, 2]))
    assert index.apply(2, stored([3], parent=2, medium="CPU")) is ApplyOutcome.APPLIED
    assert index.apply(3, BlockRemoved((2,), medium="CPU")) is ApplyOutcome.APPLIED
    assert set(index) == {1, 2}
    assert not index.needs_resync


def test_unknown_event_type_is_rejected() -> None:
    with pytest.raises(TypeError):
        ReplicaPrefixIndex().apply(1, "BlockStored")  # type: ignore[arg-type]


def test_full_index_drops_new_blocks_and_under_reports() -> None:
    index = ReplicaPrefixIndex(max_blocks=4)
    index.apply(1, stored([1, 2, 3]))
    index.apply(2, stored([4, 5, 6], parent=3))
    assert len(index) == 4
    assert index.overflowed_blocks == 2
    # The old chain's root survives: matches of old content are intact, new ones shortened.
    assert index.matched_blocks([1, 2, 3, 4, 5, 6]) == 4
    # A run below a block we dropped is unreachable: skipped, not stored.
    index.apply(3, BlockRemoved((2, 3)))
    index.apply(4, stored([7], parent=6))
    assert 7 not in index
    assert index.orphaned_blocks == 1
    # Room freed by removals is used again.
    index.apply(5, stored([8, 9], parent=1))
    assert index.matched_blocks([1, 8, 9]) == 3
    assert len(index) == 4


def test_snapshot_past_the_limit_keeps_max_blocks() -> None:
    index = ReplicaPrefixIndex(max_blocks=3)
    index.load_snapshot(range(10), seq=1)
    assert len(index) == 3
    assert index.overflowed_blocks == 7


def test_listener_sees_exactly_the_changes() -> None:
    listener = RecordingListener()
    index = ReplicaPrefixIndex(max_blocks=5, listener=listener)
    index.apply(1, stored([1, 2]))
    index.apply(2, stored([2, 3], parent=1))  # 2 again: reported once
    index.apply(3, BlockRemoved((3, 42)))  # 42 was never held
    index.load_snapshot([1, 5, 6], seq=7)
    assert listener.held == set(index) == {1, 5, 6}
    index.apply(8, stored([7, 8, 9, 10], parent=6))
    index.apply(9, AllBlocksCleared())
    assert listener.held == set(index) == set()


def test_max_blocks_must_be_positive() -> None:
    with pytest.raises(ValueError):
        ReplicaPrefixIndex(max_blocks=0)
    with pytest.raises(ValueError):
        ReplicaPrefixIndex().load_snapshot([], seq=-1)


# A random workload on the engine's own radix cache, its events replayed into an index.
workloads = st.lists(
    st.tuples(
        st.sampled_from(["insert", "evict", "clear"]),
        st.lists(st.integers(0, 2), min_size=0, max_size=10),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(workloads, st.integers(0, 39))
def test_replaying_radix_cache_events_mirrors_the_cache(
    ops: list[tuple[str, list[int]]], snapshot_at: int
) -> None:
    pool = BlockPool(12)
    events = KVEventQueue()
    tree = RadixCache(pool, BLOCK, events=events)
    from_start = ReplicaPrefixIndex()
    late: ReplicaPrefixIndex | None = None  # joins from a snapshot, as a reconnecting gateway does
    history: list[tuple[int, KVEvent]] = []
    for step, (op, tokens) in enumerate(ops):
        if op == "insert":
            hashes = HASHER.hashes(tokens)
            if len(hashes) > pool.num_free:
                tree.evict(len(hashes) - pool.num_free)
            if len(hashes) <= pool.num_free:
                ids = pool.allocate(len(hashes))
                tree.insert(hashes, tokens[: len(hashes) * BLOCK], ids)
                pool.free(ids)
        elif op == "evict":
            tree.evict(len(tokens))
        else:
            tree.clear()
        drained = events.drain()
        history.extend(drained)
        for seq, event in drained:
            assert from_start.apply(seq, event) is ApplyOutcome.APPLIED
            if late is not None:
                assert late.apply(seq, event) is ApplyOutcome.APPLIED
        if step == snapshot_at:
            late = ReplicaPrefixIndex()
            late.load_snapshot(tree.cached_block_hashes(), events.last_seq)
            # Events the snapshot already reflects, delivered again: all ignored.
            assert all(late.apply(seq, event) is ApplyOutcome.STALE for seq, event in history)
        cached = tree.cached_block_hashes()
        assert set(from_start) == cached
        assert late is None or set(late) == cached
        assert from_start.orphaned_blocks == 0
        probe = HASHER.hashes(tokens)
        expected = next((i for i, h in enumerate(probe) if h not in cached), len(probe))
        assert from_start.matched_blocks(probe) == expected
    assert not from_start.needs_resync
    assert late is None or not late.needs_resync


# ---- ApproximatePrefixIndex ----------------------------------------------------------


def test_records_match_until_they_expire() -> None:
    index = ApproximatePrefixIndex(ttl_s=10.0)
    index.record([1, 2, 3], now=0.0)
    assert index.matched_blocks([1, 2, 3, 4], now=5.0) == 3
    assert index.matched_blocks([1, 9], now=5.0) == 1
    assert index.matched_blocks([1, 2, 3], now=10.0) == 0
    assert len(index) == 0


def test_a_shared_prefix_is_refreshed_by_each_request() -> None:
    index = ApproximatePrefixIndex(ttl_s=10.0)
    index.record([1, 2, 3], now=0.0)
    index.record([1, 2, 4], now=8.0)
    assert index.expire(12.0) == 1  # only block 3 is older than the TTL
    assert index.matched_blocks([1, 2, 3], now=12.0) == 2
    assert index.matched_blocks([1, 2, 4], now=12.0) == 3


def test_over_capacity_drops_least_recent_deepest_first() -> None:
    index = ApproximatePrefixIndex(ttl_s=100.0, max_entries=4)
    index.record([1, 2, 3], now=0.0)
    index.record([5, 6], now=1.0)
    # Block 3, the deepest of the oldest request, went first; its root and block 2 stayed.
    assert set(index) == {1, 2, 5, 6}
    index.record([1, 2, 7], now=2.0)
    assert set(index) == {1, 2, 7, 5}  # then 6, a leaf, not 5, its root
    assert index.matched_blocks([1, 2, 7], now=2.0) == 3
    assert index.matched_blocks([5, 6], now=2.0) == 1  # root of the older request kept


def test_a_request_longer_than_the_index_keeps_its_leading_blocks() -> None:
    index = ApproximatePrefixIndex(ttl_s=100.0, max_entries=3)
    index.record(list(range(10)), now=0.0)
    assert index.matched_blocks(list(range(10)), now=0.0) == 3


def test_time_never_goes_backwards() -> None:
    index = ApproximatePrefixIndex(ttl_s=10.0)
    index.record([1], now=100.0)
    index.record([2], now=50.0)  # a stale `now` counts as 100
    assert index.matched_blocks([2], now=105.0) == 1
    assert index.matched_blocks([1], now=0.0) == 1
    assert index.expire(110.0) == 2


def test_approximate_listener_sees_exactly_the_changes() -> None:
    listener = RecordingListener()
    index = ApproximatePrefixIndex(ttl_s=10.0, max_entries=3, listener=listener)
    index.record([1, 2], now=0.0)
    index.record([1, 3, 4, 5, 6], now=1.0)  # more than fits: some added and dropped at once
    assert listener.held == set(index)
    index.expire(20.0)
    assert listener.held == set(index) == set()


def test_approximate_options_are_checked() -> None:
    with pytest.raises(ValueError):
        ApproximatePrefixIndex(ttl_s=0.0)
    with pytest.raises(ValueError):
        ApproximatePrefixIndex(max_entries=0)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.lists(st.integers(0, 3), max_size=6), st.floats(0, 5)),
        max_size=30,
    )
)
def test_approximate_index_stays_prefix_closed(requests: list[tuple[list[int], float]]) -> None:
    """Hashes are chains over a 4-token alphabet, so requests share prefixes as real ones do.

    Whatever TTL expiry and the size bound drop, a held block's parent is held too: matches
    are never cut short by a missing root while a deeper block takes room.
    """
    index = ApproximatePrefixIndex(ttl_s=6.0, max_entries=8)
    parent_of: dict[int, int | None] = {}
    now = 0.0
    for tokens, step in requests:
        now += step
        chain = [hash(("block", *tokens[: i + 1])) for i in range(len(tokens))]
        for i, h in enumerate(chain):
            parent_of[h] = chain[i - 1] if i else None
        index.record(chain, now)
        held = set(index)
        assert len(held) <= 8
        for h in held:
            parent = parent_of[h]
            assert parent is None or parent in held
        assert index.matched_blocks(chain, now) == min(len(chain), 8)
