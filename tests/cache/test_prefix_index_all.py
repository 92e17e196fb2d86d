"""PrefixIndex: many replicas, one shared hash -> replicas map, match_all in one pass."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cache.events import AllBlocksCleared, BlockRemoved, BlockStored
from cache.prefix_index import ApproximatePrefixIndex, PrefixIndex, ReplicaPrefixIndex


def stored(hashes: Sequence[int], parent: int | None = None) -> BlockStored:
    return BlockStored(tuple(hashes), parent, tuple(range(len(hashes) * 4)), 4)


def per_replica(index: PrefixIndex, request: Sequence[int], now: float) -> dict[str, int]:
    out: dict[str, int] = {}
    for rid in index.replica_ids:
        one = index.index(rid)
        if isinstance(one, ApproximatePrefixIndex):
            out[rid] = one.matched_blocks(request, now)
        else:
            out[rid] = one.matched_blocks(request)
    return out


def test_match_all_per_replica() -> None:
    index = PrefixIndex()
    a = index.add_replica("a")
    b = index.add_replica("b")
    c = index.add_replica("c", exact=False)
    assert isinstance(a, ReplicaPrefixIndex) and isinstance(b, ReplicaPrefixIndex)
    assert isinstance(c, ApproximatePrefixIndex)
    a.apply(1, stored([1, 2, 3, 4]))
    b.apply(1, stored([1, 2]))
    b.apply(2, stored([9], parent=2))
    index.note_routed("c", [1, 2, 3], now=0.0)
    index.note_routed("a", [7, 7, 7], now=0.0)  # exact replicas ignore it: events tell the truth
    assert index.replica_ids == ("a", "b", "c")
    assert index.match_all([1, 2, 3, 4, 5], now=1.0) == {"a": 4, "b": 2, "c": 3}
    assert index.match_all([1, 2, 9], now=1.0) == {"a": 2, "b": 3, "c": 2}
    assert index.match_all([8], now=1.0) == {"a": 0, "b": 0, "c": 0}
    assert index.match_all([], now=1.0) == {"a": 0, "b": 0, "c": 0}
    # c's records expire with the TTL; the exact replicas do not.
    later = 1.0 + index.approximate_index("c").ttl_s
    assert index.match_all([1, 2, 3, 4], now=later) == {"a": 4, "b": 2, "c": 0}


def test_replica_management() -> None:
    index = PrefixIndex()
    index.add_replica("a")
    with pytest.raises(ValueError, match="already"):
        index.add_replica("a")
    with pytest.raises(KeyError):
        index.index("zz")
    with pytest.raises(TypeError):
        index.approximate_index("a")
    index.add_replica("b", exact=False)
    with pytest.raises(TypeError):
        index.exact_index("b")
    assert len(index) == 2 and "a" in index and "zz" not in index
    index.remove_replica("a")
    assert index.replica_ids == ("b",)
    with pytest.raises(KeyError):
        index.remove_replica("a")


def test_a_removed_replica_leaves_no_trace_even_if_its_index_is_still_fed() -> None:
    index = PrefixIndex()
    old = index.add_replica("a")
    assert isinstance(old, ReplicaPrefixIndex)
    old.apply(1, stored([1, 2, 3]))
    index.remove_replica("a")
    # The new replica reuses the freed slot (bit); the old index must no longer touch it.
    new = index.add_replica("n")
    assert isinstance(new, ReplicaPrefixIndex)
    old.apply(2, stored([4], parent=3))
    old.apply(3, BlockRemoved((1,)))
    new.apply(1, stored([1, 2]))
    assert index.match_all([1, 2, 3, 4], now=0.0) == {"n": 2}
    new.apply(2, AllBlocksCleared())
    assert index.match_all([1, 2, 3, 4], now=0.0) == {"n": 0}


def test_many_replicas_and_a_long_shared_prefix() -> None:
    """100 replicas (masks wider than a machine word) sharing a 2,000-block hot prefix."""
    index = PrefixIndex()
    prefix = list(range(1, 2001))
    for i in range(100):
        replica = index.add_replica(f"r{i:03d}")
        assert isinstance(replica, ReplicaPrefixIndex)
        replica.apply(1, stored(prefix[: 20 * (i + 1)]))
        replica.apply(2, stored([10_000 + i], parent=prefix[20 * i + 19]))
    result = index.match_all(prefix, now=0.0)
    assert result == per_replica(index, prefix, 0.0)
    assert result["r000"] == 20 and result["r099"] == 2000
    assert index.match_all([*prefix[:20], 10_000], now=0.0)["r000"] == 21


# Random operations on a few replicas, exact and approximate, against per-replica answers.
ALPHABET = 3
chains = st.lists(st.integers(0, ALPHABET - 1), max_size=6).map(
    lambda tokens: [hash(("b", *tokens[: i + 1])) for i in range(len(tokens))]
)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("store"), st.integers(0, 4), chains),
        st.tuples(st.just("remove"), st.integers(0, 4), chains),
        st.tuples(st.just("clear"), st.integers(0, 4), st.just([])),
        st.tuples(st.just("snapshot"), st.integers(0, 4), chains),
        st.tuples(st.just("route"), st.integers(0, 4), chains),
        st.tuples(st.just("tick"), st.integers(1, 4), st.just([])),
        st.tuples(st.just("replace"), st.integers(0, 4), st.just([])),
        st.tuples(st.just("query"), st.integers(0, 4), chains),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(operations)
def test_match_all_equals_asking_each_replica(ops: list[tuple[str, int, list[int]]]) -> None:
    # Small bounds so that overflow and LRU dropping happen too.
    index = PrefixIndex(max_blocks=6, ttl_s=5.0, max_entries=6)
    ids = [f"r{i}" for i in range(5)]
    for i, rid in enumerate(ids):
        index.add_replica(rid, exact=i % 2 == 0)
    seqs = dict.fromkeys(ids, 0)
    now = 0.0
    for op, i, chain in ops:
        rid = ids[i % len(ids)]
        if op == "tick":
            now += i
            continue
        if op == "replace":
            exact = isinstance(index.index(rid), ApproximatePrefixIndex)  # swap kinds
            index.remove_replica(rid)
            index.add_replica(rid, exact=exact)
            seqs[rid] = 0
            continue
        one = index.index(rid)
        if op == "route":
            index.note_routed(rid, chain, now)
        elif isinstance(one, ReplicaPrefixIndex) and op != "query":
            seqs[rid] += 1
            if op == "store" and chain:
                # Store the chain's last block under its parent: sometimes an orphan.
                one.apply(seqs[rid], stored(chain[-1:], chain[-2] if len(chain) > 1 else None))
            elif op == "remove":
                one.apply(seqs[rid], BlockRemoved(tuple(chain[-1:])))
            elif op == "clear":
                one.apply(seqs[rid], AllBlocksCleared())
            elif op == "snapshot":
                one.load_snapshot(chain, seqs[rid])
        assert index.match_all(chain, now) == per_replica(index, chain, now)
