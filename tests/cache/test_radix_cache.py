"""RadixCache unit tests: match, insert, splits, locks, eviction order, events, integrity."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cache.block_pool import BlockPool
from cache.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventQueue
from cache.hashing import BlockHasher
from cache.radix_hashes import read_cached_hashes
from cache.radix_node import InsertResult, MatchResult, Node
from cache.radix_tree import RadixCache
from policies.eviction import EvictionPolicy, LFUEviction, LRUEviction

BLOCK = 2
HASHER = BlockHasher("test-model", BLOCK)


class Fixture:
    def __init__(self, num_blocks: int = 32, policy: EvictionPolicy | None = None) -> None:
        self.pool = BlockPool(num_blocks)
        self.events = KVEventQueue()
        self.tree = RadixCache(self.pool, BLOCK, policy or LRUEviction(), self.events)

    def insert(self, tokens: Sequence[int], salt: str | None = None) -> InsertResult:
        """Insert like a finished request: fresh blocks for every block, then release ours."""
        hashes = HASHER.hashes(tokens, salt)
        ids = self.pool.allocate(len(hashes))
        result = self.tree.insert(hashes, list(tokens[: len(hashes) * BLOCK]), ids)
        self.pool.free(ids)
        return result

    def match(self, tokens: Sequence[int], salt: str | None = None) -> MatchResult:
        return self.tree.match_prefix(HASHER.hashes(tokens, salt))

    def check(self) -> None:
        self.tree.check_integrity(verify_hashes=True)
        self.pool.check_integrity()
        assert self.pool.num_free + self.tree.num_cached_blocks == self.pool.num_blocks


def path_ids(tree: RadixCache, node: Node) -> list[int]:
    ids: list[int] = []
    current: Node | None = node
    while current is not None and current is not tree.root:
        ids[:0] = current.block_ids
        current = current.parent
    return ids


def test_empty_match_returns_root() -> None:
    f = Fixture()
    result = f.match([1, 2, 3, 4])
    assert result.num_blocks == 0 and result.block_ids == [] and result.node is f.tree.root
    assert f.tree.match_prefix([]).node is f.tree.root


def test_insert_then_match_full_and_longer() -> None:
    f = Fixture()
    inserted = f.insert([1, 2, 3, 4, 5, 6])
    assert inserted.num_new_blocks == 3 and inserted.block_ids == [0, 1, 2]
    assert f.tree.num_cached_blocks == 3
    full = f.match([1, 2, 3, 4, 5, 6, 7, 8])
    assert full.block_ids == [0, 1, 2] and full.num_blocks == 3 and full.node is inserted.node
    assert all(f.pool.ref_count(b) == 1 for b in full.block_ids)  # match does not touch the pool
    f.check()


def test_match_inside_a_node_splits_it() -> None:
    f = Fixture()
    whole = f.insert([1, 2, 3, 4, 5, 6]).node
    result = f.match([1, 2, 3, 4, 9, 9])
    assert result.block_ids == [0, 1]
    upper = result.node
    assert upper.block_ids == [0, 1] and upper.children == {whole.block_hashes[0]: whole}
    assert whole.block_ids == [2] and whole.parent is upper  # the lower part keeps its identity
    assert whole.parent_hash == upper.block_hashes[-1]
    f.check()


def test_insert_diverging_inside_a_node_splits_it() -> None:
    f = Fixture()
    first = f.insert([1, 2, 3, 4, 5, 6]).node
    second = f.insert([1, 2, 3, 4, 7, 8, 9, 9])
    assert second.num_new_blocks == 2
    assert second.block_ids[:2] == [0, 1]  # shared prefix keeps the tree's ids
    shared = first.parent
    assert shared is not None and shared is second.node.parent and shared.parent is f.tree.root
    assert len(shared.children) == 2 and shared.block_ids == [0, 1]
    assert f.tree.num_cached_blocks == 5
    f.check()


def test_insert_shorter_than_existing_returns_split_node() -> None:
    f = Fixture()
    f.insert([1, 2, 3, 4, 5, 6])
    result = f.insert([1, 2])
    assert result.num_new_blocks == 0 and result.block_ids == [0]
    assert result.node.block_ids == [0]
    f.check()


def test_duplicate_insert_returns_existing_ids_and_adopts_only_new() -> None:
    f = Fixture()
    f.insert([1, 2, 3, 4])
    hashes = HASHER.hashes([1, 2, 3, 4, 5, 6])
    mine = f.pool.allocate(3)
    result = f.tree.insert(hashes, [1, 2, 3, 4, 5, 6], mine)
    assert result.block_ids == [0, 1, mine[2]] and result.num_new_blocks == 1
    # The tree touched only the block it adopted; our duplicates still have only our ref.
    assert [f.pool.ref_count(b) for b in mine] == [1, 1, 2]
    assert [f.pool.ref_count(b) for b in (0, 1)] == [1, 1]
    released = f.pool.free(mine)
    assert released == mine[:2]
    f.check()


def test_insert_validates_before_changing_anything() -> None:
    f = Fixture()
    hashes = HASHER.hashes([1, 2, 3, 4])
    with pytest.raises(ValueError, match="block ids"):
        f.tree.insert(hashes, [1, 2, 3, 4], [0])
    with pytest.raises(ValueError, match="token ids"):
        f.tree.insert(hashes, [1, 2, 3], [0, 1])
    with pytest.raises(ValueError, match="free"):
        f.tree.insert(hashes, [1, 2, 3, 4], [5, 6])  # blocks 5 and 6 were never allocated
    a, b = f.pool.allocate(2)
    with pytest.raises(ValueError, match="duplicate"):
        f.tree.insert(hashes, [1, 2, 3, 4], [a, a])
    f.tree.insert(hashes, [1, 2, 3, 4], [a, b])
    with pytest.raises(ValueError, match="already"):
        f.tree.insert(HASHER.hashes([7, 7]), [7, 7], [a])
    f.pool.free([a, b])
    assert f.tree.num_cached_blocks == 2
    f.check()


def test_empty_insert_is_a_no_op() -> None:
    f = Fixture()
    result = f.tree.insert([], [], [])
    assert result.node is f.tree.root and result.block_ids == [] and result.num_new_blocks == 0
    assert f.events.drain() == []


def test_lock_propagates_to_ancestors_and_unlock_below_zero_raises() -> None:
    f = Fixture()
    f.insert([1, 2, 3, 4])
    leaf = f.insert([1, 2, 3, 4, 5, 6]).node
    parent = leaf.parent
    assert parent is not None
    f.tree.lock(leaf)
    assert (leaf.lock_ref, parent.lock_ref, f.tree.root.lock_ref) == (1, 1, 1)
    assert f.tree.num_evictable_blocks == 0
    with pytest.raises(ValueError, match="unlock"):
        f.tree.unlock(parent)  # holds only its child's lock, none of its own
    f.tree.unlock(leaf)
    assert (leaf.lock_ref, parent.lock_ref, f.tree.root.lock_ref) == (0, 0, 0)
    assert f.tree.num_evictable_blocks == 3
    with pytest.raises(ValueError, match="unlock"):
        f.tree.unlock(leaf)
    f.check()


def test_split_of_locked_node_carries_lock_ref() -> None:
    f = Fixture()
    node = f.insert([1, 2, 3, 4, 5, 6]).node
    f.tree.lock(node)
    f.tree.lock(node)
    upper = f.match([1, 2]).node
    assert upper is not node and upper.lock_ref == node.lock_ref == 2
    assert upper.direct_locks == 0 and node.direct_locks == 2
    f.check()
    f.tree.unlock(node)
    f.tree.unlock(node)
    assert upper.lock_ref == 0
    f.check()


def test_lock_rejects_evicted_and_foreign_nodes() -> None:
    f = Fixture()
    node = f.insert([1, 2]).node
    f.tree.evict(1)
    with pytest.raises(ValueError, match="not in this tree"):
        f.tree.lock(node)
    other = Fixture()
    foreign = other.insert([1, 2]).node
    with pytest.raises(ValueError, match="not in this tree"):
        f.tree.lock(foreign)


def test_lru_evicts_least_recently_used_leaf() -> None:
    f = Fixture()
    f.insert([1, 1])
    f.insert([2, 2])
    f.insert([3, 3])
    f.match([1, 1])  # now [2, 2] is the oldest
    assert f.tree.evict(1) == 1
    assert f.tree.cached_block_hashes() == set(HASHER.hashes([1, 1]) + HASHER.hashes([3, 3]))
    f.check()


def test_lfu_evicts_least_hit_leaf_even_if_recent() -> None:
    f = Fixture(policy=LFUEviction())
    f.insert([1, 1])
    f.insert([2, 2])
    f.match([1, 1])
    f.match([1, 1])
    f.match([2, 2])  # most recent, but hit once against twice
    f.insert([3, 3])  # newest, never hit: evicted first
    f.tree.evict(1)
    assert HASHER.hashes([3, 3])[0] not in f.tree.cached_block_hashes()
    f.tree.evict(1)
    assert f.tree.cached_block_hashes() == set(HASHER.hashes([1, 1]))
    f.check()


def test_eviction_trims_a_leaf_from_its_tail() -> None:
    f = Fixture()
    tokens = [1, 2, 3, 4, 5, 6, 7, 8]
    hashes = HASHER.hashes(tokens)
    node = f.insert(tokens).node
    assert f.tree.evict(1) == 1
    assert node.block_hashes == hashes[:3] and node.token_ids == tokens[:6]
    assert f.match(tokens).num_blocks == 3
    assert f.tree.evict(2) == 2
    assert f.tree.cached_block_hashes() == {hashes[0]}
    f.check()


def test_emptied_leaf_exposes_parent_as_new_leaf() -> None:
    f = Fixture()
    f.insert([1, 1, 2, 2])
    f.insert([1, 1, 3, 3])  # shared [1, 1] becomes an interior node with two leaves
    f.insert([1, 1, 2, 2, 4, 4])
    assert f.tree.evict(10) == 4
    assert f.tree.num_cached_blocks == 0 and f.tree.root.children == {}
    f.check()


def test_locked_blocks_are_never_evicted() -> None:
    f = Fixture()
    locked = f.insert([1, 1, 2, 2]).node
    f.insert([1, 1, 2, 2, 3, 3])  # an unlocked child below a locked node
    f.insert([4, 4])
    f.tree.lock(locked)
    assert f.tree.num_evictable_blocks == 2
    assert f.tree.evict(100) == 2
    assert f.tree.cached_block_hashes() == set(HASHER.hashes([1, 1, 2, 2]))
    assert f.tree.evict(1) == 0
    f.tree.unlock(locked)
    assert f.tree.evict(1) == 1
    f.check()


def test_unlocked_interior_blocks_count_as_evictable() -> None:
    f = Fixture()
    f.insert([1, 1, 2, 2])
    f.insert([1, 1, 3, 3])
    assert f.tree.num_cached_blocks == 3
    assert f.tree.num_evictable_blocks == 3


def test_evict_counts_only_blocks_returned_to_the_pool() -> None:
    f = Fixture(num_blocks=8)
    result = f.insert([1, 1, 2, 2])
    f.pool.touch(result.block_ids)  # a request still reads these blocks without a lock
    f.insert([3, 3])
    assert f.tree.evict(1) == 1  # [1,1,2,2] is older: dropped from the tree, still held; then [3,3]
    assert f.tree.num_cached_blocks == 0
    assert f.pool.num_free == 6
    assert f.pool.free(result.block_ids) == result.block_ids


def test_access_clock_and_hit_counts() -> None:
    f = Fixture()
    node = f.insert([1, 1, 2, 2]).node
    assert (node.last_access, node.hit_count) == (1, 0)
    f.match([1, 1, 2, 2])
    f.match([1, 1, 2, 2])
    assert (node.last_access, node.hit_count) == (3, 2)
    upper = f.match([1, 1]).node
    assert (upper.last_access, upper.hit_count, node.last_access, node.hit_count) == (4, 3, 3, 2)


def test_salts_keep_tenants_apart() -> None:
    f = Fixture()
    f.insert([1, 1, 2, 2], salt="a")
    assert f.match([1, 1, 2, 2], salt="b").num_blocks == 0
    assert f.match([1, 1, 2, 2]).num_blocks == 0
    f.insert([1, 1, 2, 2], salt="b")
    assert len(f.tree.root.children) == 2
    f.check()


def test_events_for_insert_evict_and_clear() -> None:
    f = Fixture()
    tokens = [1, 1, 2, 2, 3, 3]
    h = HASHER.hashes(tokens)
    f.insert(tokens[:2])
    f.insert(tokens)
    f.insert(tokens)  # nothing new: no event
    events = [event for _, event in f.events.drain()]
    assert events == [
        BlockStored(block_hashes=(h[0],), parent_block_hash=None, token_ids=(1, 1), block_size=BLOCK),
        BlockStored(block_hashes=(h[1], h[2]), parent_block_hash=h[0], token_ids=(2, 2, 3, 3), block_size=2),
    ]
    f.tree.evict(1)
    assert [e for _, e in f.events.drain()] == [BlockRemoved((h[2],))]
    f.tree.evict(0)
    assert f.events.drain() == []
    other = f.insert([9, 9]).node
    f.tree.lock(other)
    f.events.drain()
    assert f.tree.clear() == 2
    assert [e for _, e in f.events.drain()] == [BlockRemoved((h[1], h[0]))]
    f.tree.unlock(other)
    assert f.tree.clear() == 1
    assert [e for _, e in f.events.drain()] == [AllBlocksCleared()]
    assert f.tree.num_cached_blocks == 0
    f.check()


def test_tree_without_event_queue() -> None:
    pool = BlockPool(4)
    tree = RadixCache(pool, BLOCK)
    ids = pool.allocate(1)
    tree.insert(HASHER.hashes([1, 1]), [1, 1], ids)
    pool.free(ids)
    assert tree.clear() == 1
    assert isinstance(tree.policy, LRUEviction)


def test_cached_block_hashes_snapshot() -> None:
    f = Fixture()
    f.insert([1, 1, 2, 2])
    f.insert([1, 1, 3, 3])
    assert f.tree.cached_block_hashes() == set(HASHER.hashes([1, 1, 2, 2]) + HASHER.hashes([1, 1, 3, 3]))


def test_locked_leaf_path_ids_stay_stable_through_splits() -> None:
    f = Fixture()
    f.insert([1, 1, 4, 4])
    leaf = f.insert([1, 1, 2, 2, 3, 3]).node
    before = path_ids(f.tree, leaf)
    f.tree.lock(leaf)
    f.match([1, 1, 2, 2])  # splits inside the locked path
    f.tree.clear()
    assert path_ids(f.tree, leaf) == before
    f.tree.unlock(leaf)
    f.check()


@settings(max_examples=150, deadline=None)
@given(
    cached=st.lists(st.lists(st.integers(0, 3), max_size=12), max_size=4),
    prompt=st.lists(st.integers(0, 3), max_size=14),
    salt=st.sampled_from([None, "a"]),
    num_blocks_cut=st.integers(0, 3),
)
def test_read_hashes_equals_hashing_every_block(
    cached: list[list[int]], prompt: list[int], salt: str | None, num_blocks_cut: int
) -> None:
    # Hashes read from the tree's nodes (one computed per node) are those of the tokens.
    f = Fixture(num_blocks=64)
    for tokens in cached:
        f.insert(tokens)
    num_blocks = max(0, len(prompt) // BLOCK - num_blocks_cut)
    hashes: list[int] = []
    computed: list[int] = []

    def extend(out: list[int], up_to: int) -> None:
        computed.append(up_to - len(out))
        HASHER.extend(out, prompt, up_to, salt)

    read_cached_hashes(f.tree, hashes, prompt, num_blocks, extend)
    assert len(hashes) <= num_blocks
    extend(hashes, num_blocks)
    assert hashes == HASHER.hashes(prompt, salt)[:num_blocks]
    f.check()


def test_read_hashes_computes_one_hash_per_node_of_a_cached_prefix() -> None:
    f = Fixture(num_blocks=64)
    prefix = list(range(40))
    f.insert(prefix)
    f.insert(prefix[:20] + [99] * 10)  # splits the first node after 10 blocks
    prompt = [*prefix, 7, 7, 7]
    calls: list[int] = []

    def extend(out: list[int], up_to: int) -> None:
        calls.append(up_to - len(out))
        HASHER.extend(out, prompt, up_to)

    hashes: list[int] = []
    read_cached_hashes(f.tree, hashes, prompt, len(prompt) // BLOCK, extend)
    # Two nodes found by their first hash; the third hash (block 20) finds nothing cached.
    assert hashes == HASHER.hashes(prompt)[:21] and calls == [1, 1, 1]
