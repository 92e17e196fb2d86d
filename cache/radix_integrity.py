"""Invariant checks for RadixCache: slow (they walk the whole tree), for tests and debugging."""

from __future__ import annotations

from collections.abc import Mapping

from sortedcontainers import SortedList

from cache.block_pool import BlockPool, IntegrityError
from cache.hashing import hash_block
from cache.radix_node import Node
from policies.eviction import EvictionPolicy


def iter_nodes(root: Node) -> list[Node]:
    """Every node reachable from `root`, breadth first, root included."""
    nodes = [root]
    i = 0
    while i < len(nodes):
        nodes.extend(nodes[i].children.values())
        i += 1
    return nodes


def check_radix_tree(
    root: Node,
    *,
    pool: BlockPool,
    block_size: int,
    policy: EvictionPolicy,
    evictable: SortedList,
    evictable_nodes: Mapping[int, Node],
    num_cached_blocks: int,
    num_evictable_blocks: int,
    tree_block_ids: set[int],
    verify_hashes: bool,
) -> None:
    """Raise IntegrityError unless the tree rooted at `root` and its bookkeeping agree."""
    if root.block_ids or root.block_hashes or root.token_ids or root.parent is not None:
        raise IntegrityError("root must hold no blocks and have no parent")
    num_blocks = 0
    num_unlocked_blocks = 0
    evictable_seqs: set[int] = set()
    block_ids: set[int] = set()
    hashes: set[int] = set()
    for node in iter_nodes(root):
        _check_shape(node, root, block_size)
        num_blocks += len(node.block_ids)
        if node.lock_ref == 0:
            num_unlocked_blocks += len(node.block_ids)
        for block_id in node.block_ids:
            if block_id in block_ids:
                raise IntegrityError(f"block {block_id} appears twice in the tree")
            block_ids.add(block_id)
            if pool.ref_count(block_id) == 0:
                raise IntegrityError(f"tree block {block_id} has pool reference count 0")
        for h in node.block_hashes:
            # Subscribers index hashes as a set; a repeat (a 64-bit collision or a bug) would
            # make a later BlockRemoved drop a block that is still cached.
            if h in hashes:
                raise IntegrityError(f"hash {h:#x} appears twice in the tree")
            hashes.add(h)
        if verify_hashes:
            _check_hashes(node, block_size)
        _check_children(node, root)
        should_be_evictable = node is not root and not node.children and node.lock_ref == 0
        expected_key = (policy.priority(node.stats), node.seq) if should_be_evictable else None
        if node.evict_key != expected_key:
            raise IntegrityError(f"{node!r}: evictable key {node.evict_key} != {expected_key}")
        if should_be_evictable:
            evictable_seqs.add(node.seq)
            if evictable_nodes.get(node.seq) is not node or expected_key not in evictable:
                raise IntegrityError(f"{node!r} is an evictable leaf missing from the sorted set")
    if len(evictable) != len(evictable_seqs) or set(evictable_nodes) != evictable_seqs:
        raise IntegrityError("the evictable set holds stale entries")
    if sorted(key[1] for key in evictable) != sorted(evictable_seqs):
        raise IntegrityError("the sorted evictable set disagrees with its node map")
    if num_blocks != num_cached_blocks or block_ids != tree_block_ids:
        raise IntegrityError(f"counted {num_blocks} blocks, counter says {num_cached_blocks}")
    if num_unlocked_blocks != num_evictable_blocks:
        raise IntegrityError(
            f"counted {num_unlocked_blocks} unlocked blocks, counter says {num_evictable_blocks}"
        )


def _check_shape(node: Node, root: Node, block_size: int) -> None:
    n = len(node.block_ids)
    if len(node.block_hashes) != n or len(node.token_ids) != n * block_size:
        raise IntegrityError(
            f"{node!r}: {len(node.block_hashes)} hashes, {n} block ids, {len(node.token_ids)} tokens"
        )
    if node is not root and n == 0:
        raise IntegrityError(f"{node!r} is empty but still in the tree")


def _check_children(node: Node, root: Node) -> None:
    child_locks = 0
    expected_parent_hash = node.block_hashes[-1] if node is not root else None
    for key, child in node.children.items():
        if child.parent is not node:
            raise IntegrityError(f"{child!r} has the wrong parent pointer")
        if not child.block_hashes or key != child.block_hashes[0]:
            raise IntegrityError(f"{child!r} is keyed by {key:#x}, not its first block hash")
        if child.parent_hash != expected_parent_hash:
            raise IntegrityError(f"{child!r} does not chain from its parent's last hash")
        # Every access touches the whole path from the root, so a parent is never older.
        if child.last_access > node.last_access:
            raise IntegrityError(f"{child!r} was accessed after its parent {node!r}")
        child_locks += child.lock_ref
    if node.direct_locks < 0 or node.lock_ref != node.direct_locks + child_locks:
        raise IntegrityError(
            f"{node!r}: lock_ref {node.lock_ref} != {node.direct_locks} direct + {child_locks} below"
        )


def _check_hashes(node: Node, block_size: int) -> None:
    for j, h in enumerate(node.block_hashes):
        parent = node.block_hashes[j - 1] if j > 0 else node.parent_hash
        if parent is None:
            continue  # block 0 of a sequence: its extra (model id, salt) is not stored
        if hash_block(parent, node.token_ids[j * block_size : (j + 1) * block_size]) != h:
            raise IntegrityError(f"{node!r}: block {j} hash does not chain from its tokens")
