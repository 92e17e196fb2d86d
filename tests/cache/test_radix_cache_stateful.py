"""Stateful property test of RadixCache against a flat reference model, plus KV-event replay.

The reference keeps one entry per cached block, keyed by its path of block hashes from the
root, with per-block access time, hit count and lock count. It knows nothing of nodes or
splits, so agreement shows the compressed tree behaves like the simple per-block cache.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cache.block_pool import BlockPool
from cache.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent, KVEventQueue
from cache.hashing import BlockHasher
from cache.radix_node import Node
from cache.radix_tree import RadixCache
from policies.eviction import EvictionPolicy, LFUEviction, LRUEviction, NodeStats

BLOCK = 2
NUM_BLOCKS = 16
HASHER = BlockHasher("test-model", BLOCK)
Path = tuple[int, ...]

# A two-token alphabet and two-token blocks: only four distinct blocks, so prefixes collide
# often and inserts and matches split nodes all the time.
token_seqs = st.integers(1, 5).flatmap(
    lambda n: st.lists(st.integers(0, 1), min_size=n * BLOCK, max_size=n * BLOCK)
)
salts = st.sampled_from([None, "tenant"])


def path_ids(tree: RadixCache, node: Node) -> list[int]:
    ids: list[int] = []
    current: Node | None = node
    while current is not None and current is not tree.root:
        ids[:0] = current.block_ids
        current = current.parent
    return ids


def replay(state: set[int], event: KVEvent) -> None:
    """What a gateway prefix index does with each event."""
    if isinstance(event, BlockStored):
        assert event.parent_block_hash is None or event.parent_block_hash in state
        assert len(event.token_ids) == len(event.block_hashes) * event.block_size
        assert state.isdisjoint(event.block_hashes)
        state.update(event.block_hashes)
    elif isinstance(event, BlockRemoved):
        assert set(event.block_hashes) <= state
        state.difference_update(event.block_hashes)
    else:
        assert isinstance(event, AllBlocksCleared)
        state.clear()


class RadixCacheMachine(RuleBasedStateMachine):
    policy: EvictionPolicy = LRUEviction()

    def __init__(self) -> None:
        super().__init__()
        self.pool = BlockPool(NUM_BLOCKS)
        self.events = KVEventQueue()
        self.tree = RadixCache(self.pool, BLOCK, self.policy, self.events)
        # Reference model, one entry per cached block.
        self.ids: dict[Path, int] = {}
        self.access: dict[Path, int] = {}
        self.hits: dict[Path, int] = {}
        self.locks: Counter[Path] = Counter()
        self.clock = 0
        # What the test itself holds, like running requests would.
        self.test_refs: Counter[int] = Counter()
        self.locked: list[tuple[Node, Path, list[int]]] = []
        self.held: list[list[int]] = []
        self.replayed: set[int] = set()
        self.last_seq = 0

    # ---- reference model -------------------------------------------------------------

    def _priority(self, path: Path) -> tuple[int, ...]:
        # Per-block stats; num_blocks is per node in the tree, and neither policy reads it.
        return self.policy.priority(NodeStats(self.access[path], self.hits[path], 1))

    def _model_evict(self, num_blocks: int, everything: bool = False) -> tuple[set[int], int]:
        """Evict one block at a time: the unlocked leaf block with the lowest priority."""
        removed: set[int] = set()
        freed = 0
        while everything or freed < num_blocks:
            parents = {p[:-1] for p in self.ids}
            leaves = [p for p in self.ids if p not in parents and self.locks[p] == 0]
            if not leaves:
                break
            victim = min(leaves, key=self._priority)
            # Keys of leaves never tie: blocks touched at one clock tick lie on one path.
            assert [self._priority(p) for p in leaves].count(self._priority(victim)) == 1
            block_id = self.ids.pop(victim)
            del self.access[victim], self.hits[victim]
            removed.add(victim[-1])
            freed += self.test_refs[block_id] == 0
        return removed, freed

    def _checked_evict(self, num_blocks: int) -> None:
        expected_removed, expected_freed = self._model_evict(num_blocks)
        before = self.tree.cached_block_hashes()
        assert self.tree.evict(num_blocks) == expected_freed
        assert before - self.tree.cached_block_hashes() == expected_removed

    def _model_prefix(self, hashes: list[int]) -> int:
        k = 0
        while k < len(hashes) and tuple(hashes[: k + 1]) in self.ids:
            k += 1
        return k

    # ---- rules -----------------------------------------------------------------------

    @rule(tokens=token_seqs, salt=salts)
    def insert(self, tokens: list[int], salt: str | None) -> None:
        hashes = HASHER.hashes(tokens, salt)
        n = len(hashes)
        if self.pool.num_free < n:
            self._checked_evict(n - self.pool.num_free)
        if self.pool.num_free < n:
            return  # everything left is locked or held: a real scheduler would wait
        mine = self.pool.allocate(n)
        result = self.tree.insert(hashes, tokens, mine)
        self.clock += 1
        expected: list[int] = []
        new = 0
        for i in range(n):
            path = tuple(hashes[: i + 1])
            if path not in self.ids:
                self.ids[path], self.hits[path] = mine[i], 0
                new += 1
            self.access[path] = self.clock
            expected.append(self.ids[path])
        assert result.block_ids == expected
        assert result.num_new_blocks == new
        assert path_ids(self.tree, result.node) == expected
        self.pool.free(mine)  # the request is done; the tree keeps what it adopted

    @rule(tokens=token_seqs, salt=salts, mode=st.sampled_from(["peek", "lock", "hold"]))
    def match(self, tokens: list[int], salt: str | None, mode: str) -> None:
        hashes = HASHER.hashes(tokens, salt)
        result = self.tree.match_prefix(hashes)
        self.clock += 1
        k = self._model_prefix(hashes)
        paths = [tuple(hashes[: i + 1]) for i in range(k)]
        for path in paths:
            self.access[path] = self.clock
            self.hits[path] += 1
        assert result.num_blocks == k
        assert result.block_ids == [self.ids[p] for p in paths]
        assert path_ids(self.tree, result.node) == result.block_ids
        if mode == "peek":
            return
        self.pool.touch(result.block_ids)
        self.test_refs.update(result.block_ids)
        if mode == "lock":
            self.tree.lock(result.node)
            self.locks.update(paths)
            self.locked.append((result.node, tuple(hashes[:k]), result.block_ids))
        else:
            self.held.append(result.block_ids)  # used without a lock: may be evicted under us

    @precondition(lambda self: self.locked)
    @rule(data=st.data())
    def unlock(self, data: st.DataObject) -> None:
        node, path, block_ids = self.locked.pop(data.draw(st.integers(0, len(self.locked) - 1)))
        self.tree.unlock(node)
        self.locks.subtract(path[: i + 1] for i in range(len(path)))
        self.pool.free(block_ids)
        self.test_refs.subtract(block_ids)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        block_ids = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        self.pool.free(block_ids)
        self.test_refs.subtract(block_ids)

    @rule(num_blocks=st.integers(0, NUM_BLOCKS))
    def evict(self, num_blocks: int) -> None:
        self._checked_evict(num_blocks)

    @rule()
    def clear(self) -> None:
        _, expected_freed = self._model_evict(0, everything=True)
        assert self.tree.clear() == expected_freed
        assert self.tree.num_cached_blocks == len(self.ids)

    # ---- invariants ------------------------------------------------------------------

    @invariant()
    def structures_are_consistent(self) -> None:
        self.tree.check_integrity(verify_hashes=True)
        self.pool.check_integrity()

    @invariant()
    def every_block_is_accounted_for(self) -> None:
        tree_ids = set(self.ids.values())
        held_only_by_test = {b for b, n in self.test_refs.items() if n > 0} - tree_ids
        assert self.pool.num_free + self.tree.num_cached_blocks + len(held_only_by_test) == NUM_BLOCKS
        for block_id in tree_ids | held_only_by_test:
            assert self.pool.ref_count(block_id) == (block_id in tree_ids) + self.test_refs[block_id]

    @invariant()
    def tree_agrees_with_model(self) -> None:
        assert self.tree.cached_block_hashes() == {p[-1] for p in self.ids}
        assert self.tree.num_cached_blocks == len(self.ids)
        assert self.tree.num_evictable_blocks == sum(self.locks[p] == 0 for p in self.ids)
        # Same logical clock on both sides, so node stats equal the model's per-block stats.
        stack: list[tuple[Node, Path]] = [(self.tree.root, ())]
        while stack:
            node, prefix = stack.pop()
            for h, block_id in zip(node.block_hashes, node.block_ids, strict=True):
                prefix = (*prefix, h)
                assert self.ids[prefix] == block_id
                assert (self.access[prefix], self.hits[prefix]) == (node.last_access, node.hit_count)
                assert self.locks[prefix] == node.lock_ref
            stack.extend((child, prefix) for child in node.children.values())

    @invariant()
    def locked_paths_keep_their_blocks(self) -> None:
        for node, path, block_ids in self.locked:
            assert path_ids(self.tree, node) == block_ids
            assert all(path[: i + 1] in self.ids for i in range(len(path)))

    @invariant()
    def events_replay_to_the_cached_set(self) -> None:
        for seq, event in self.events.drain():
            assert seq == self.last_seq + 1
            self.last_seq = seq
            replay(self.replayed, event)
        assert self.replayed == self.tree.cached_block_hashes()
        assert self.events.dropped == 0


class LFURadixCacheMachine(RadixCacheMachine):
    policy = LFUEviction()


STATEFUL_SETTINGS = settings(max_examples=100, stateful_step_count=40, deadline=None)
TestRadixCacheLRU = RadixCacheMachine.TestCase
TestRadixCacheLRU.settings = STATEFUL_SETTINGS
TestRadixCacheLFU = LFURadixCacheMachine.TestCase
TestRadixCacheLFU.settings = STATEFUL_SETTINGS


operations = st.lists(
    st.tuples(st.sampled_from(["insert", "match", "evict", "lock", "unlock", "clear"]), token_seqs, salts),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(ops=operations, num_evict=st.integers(1, 6))
def test_replaying_drained_events_reconstructs_cached_hashes(
    ops: list[tuple[str, list[int], str | None]], num_evict: int
) -> None:
    """A subscriber that reads events only now and then still ends with the exact cached set."""
    pool = BlockPool(NUM_BLOCKS)
    events = KVEventQueue()
    tree = RadixCache(pool, BLOCK, LRUEviction(), events)
    snapshot: set[int] = set()
    locked: list[Node] = []
    for i, (op, tokens, salt) in enumerate(ops):
        hashes = HASHER.hashes(tokens, salt)
        if op == "insert":
            tree.evict(max(0, len(hashes) - pool.num_free))
            if pool.num_free >= len(hashes):
                mine = pool.allocate(len(hashes))
                tree.insert(hashes, tokens, mine)
                pool.free(mine)
        elif op == "match":
            tree.match_prefix(hashes)
        elif op == "evict":
            tree.evict(num_evict)
        elif op == "lock":
            node = tree.match_prefix(hashes).node
            tree.lock(node)
            locked.append(node)
        elif op == "unlock" and locked:
            tree.unlock(locked.pop(0))
        elif op == "clear":
            tree.clear()
        if i % 7 == 0:
            for _, event in events.drain():
                replay(snapshot, event)
    for _, event in events.drain():
        replay(snapshot, event)
    assert snapshot == tree.cached_block_hashes()
    tree.check_integrity(verify_hashes=True)
