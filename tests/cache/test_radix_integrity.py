"""RadixCache.check_integrity: each kind of corruption is reported."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from cache.block_pool import BlockPool, IntegrityError
from cache.hashing import BlockHasher
from cache.radix_node import Node
from cache.radix_tree import RadixCache

BLOCK = 2
HASHER = BlockHasher("test-model", BLOCK)


class Populated:
    """A tree with a shared [1, 1] node and two leaves, [2, 2, 3, 3] and [4, 4]."""

    def __init__(self) -> None:
        self.pool = BlockPool(16)
        self.tree = RadixCache(self.pool, BLOCK)
        for tokens in ([1, 1, 2, 2, 3, 3], [1, 1, 4, 4]):
            hashes = HASHER.hashes(tokens)
            ids = self.pool.allocate(len(hashes))
            self.tree.insert(hashes, tokens, ids)
            self.pool.free(ids)
        self.tree.check_integrity(verify_hashes=True)

    def node(self, tokens: Sequence[int]) -> Node:
        return self.tree.match_prefix(HASHER.hashes(tokens)).node


def test_integrity_detects_inconsistent_lengths() -> None:
    f = Populated()
    leaf = f.node([1, 1, 4, 4])
    leaf.token_ids.append(0)
    with pytest.raises(IntegrityError, match="tokens"):
        f.tree.check_integrity()


def test_integrity_detects_wrong_child_key() -> None:
    f = Populated()
    shared = f.node([1, 1])
    key, child = next(iter(shared.children.items()))
    del shared.children[key]
    shared.children[key ^ 1] = child
    with pytest.raises(IntegrityError, match="keyed"):
        f.tree.check_integrity()


def test_integrity_detects_lock_ref_mismatch() -> None:
    f = Populated()
    f.node([1, 1]).lock_ref += 1
    with pytest.raises(IntegrityError, match="lock_ref"):
        f.tree.check_integrity()


def test_integrity_detects_stale_evictable_entry() -> None:
    f = Populated()
    leaf = f.node([1, 1, 4, 4])
    leaf.hit_count += 5  # changed without refreshing its key (LFU-like policies would care)
    leaf.last_access -= 1
    with pytest.raises(IntegrityError, match="evictable"):
        f.tree.check_integrity()


def test_integrity_detects_block_with_no_pool_reference() -> None:
    f = Populated()
    block = f.node([1, 1]).block_ids[0]
    f.pool._ref_counts[block] = 0
    with pytest.raises(IntegrityError, match="reference count 0"):
        f.tree.check_integrity()


def test_integrity_detects_broken_chain() -> None:
    f = Populated()
    leaf = f.node([1, 1, 4, 4])
    leaf.parent_hash = 12345
    with pytest.raises(IntegrityError, match="chain"):
        f.tree.check_integrity()


def test_integrity_verifies_hashes_from_tokens() -> None:
    f = Populated()
    leaf = f.node([1, 1, 4, 4])
    leaf.token_ids[0] = 5
    f.tree.check_integrity()  # without verify_hashes tokens are not re-hashed
    with pytest.raises(IntegrityError, match="hash"):
        f.tree.check_integrity(verify_hashes=True)


def test_integrity_detects_block_id_twice() -> None:
    f = Populated()
    leaf = f.node([1, 1, 4, 4])
    leaf.block_ids[0] = f.node([1, 1]).block_ids[0]
    with pytest.raises(IntegrityError, match="twice"):
        f.tree.check_integrity()


def test_integrity_detects_wrong_counters() -> None:
    f = Populated()
    f.tree._num_evictable_blocks += 1
    with pytest.raises(IntegrityError, match="unlocked blocks"):
        f.tree.check_integrity()
    f = Populated()
    f.tree._num_cached_blocks -= 1
    with pytest.raises(IntegrityError, match="counter"):
        f.tree.check_integrity()


def test_integrity_detects_entry_for_a_node_that_is_not_a_leaf() -> None:
    f = Populated()
    shared = f.node([1, 1])
    f.tree._evictable.add(((shared.last_access,), shared.seq))
    f.tree._evictable_nodes[shared.seq] = shared
    with pytest.raises(IntegrityError, match="stale"):
        f.tree.check_integrity()
