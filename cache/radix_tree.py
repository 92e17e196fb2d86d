"""A page-aligned radix tree of cached KV blocks (SGLang's RadixAttention, by block).

Edges are whole blocks, compared by chained block hash, so one integer comparison decides
whether a whole block prefix matches. A node holds a run of blocks; a path that diverges
inside a run splits it at the block boundary. The lower half of a split keeps the original
Node object, so a node handed to a caller (and possibly locked) always ends at the same
block.

Eviction takes unlocked leaves in the policy's order, trimming blocks from a leaf's tail
so that a partially evicted run is still a valid prefix. The evictable leaves are kept in
a SortedList updated on every change, so eviction never walks the tree.

Ownership: the tree holds one pool reference per block it contains. A caller that keeps
using matched blocks touches them itself, and locks the node so they stay cached.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Sequence

from sortedcontainers import SortedList

from cache.block_pool import BlockPool
from cache.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent, KVEventQueue
from cache.radix_integrity import check_radix_tree, iter_nodes
from cache.radix_node import EvictKey, InsertResult, MatchResult, Node
from policies.eviction import EvictionPolicy, LRUEviction

_DEFAULT_POLICY = LRUEviction()


class RadixCache:
    def __init__(
        self,
        pool: BlockPool,
        block_size: int,
        policy: EvictionPolicy = _DEFAULT_POLICY,
        events: KVEventQueue | None = None,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self._pool = pool
        self._block_size = block_size
        self._policy = policy
        self._events = events
        self._seqs = itertools.count()
        # Logical clock, one tick per match or insert: deterministic, unlike wall time.
        self._clock = 0
        self._root = Node(next(self._seqs), None, None, [], [], [], last_access=0)
        self._evictable: SortedList = SortedList()
        self._evictable_nodes: dict[int, Node] = {}
        self._num_cached_blocks = 0
        self._num_evictable_blocks = 0
        self._tree_block_ids: set[int] = set()

    # ---- read-only views -------------------------------------------------------------

    @property
    def root(self) -> Node:
        return self._root

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def policy(self) -> EvictionPolicy:
        return self._policy

    @property
    def clock(self) -> int:
        return self._clock

    @property
    def num_cached_blocks(self) -> int:
        return self._num_cached_blocks

    @property
    def num_evictable_blocks(self) -> int:
        """Blocks in unlocked nodes: all of them can be freed by evicting leaves repeatedly."""
        return self._num_evictable_blocks

    def cached_block_hashes(self) -> set[int]:
        """Every hash in the tree: the snapshot a KV-event subscriber starts from."""
        out: set[int] = set()
        for node in iter_nodes(self._root):
            out.update(node.block_hashes)
        return out

    # ---- match and insert ------------------------------------------------------------

    def match_prefix(self, block_hashes: Sequence[int]) -> MatchResult:
        """Longest cached prefix of `block_hashes`.

        Every matched node gets the current clock and one more hit; a match that ends inside
        a node splits it so that `node` ends exactly at the match (ready to lock). Pool
        reference counts are unchanged: a caller that keeps the blocks touches them.
        """
        now = self._tick()
        node = self._root
        matched: list[int] = []
        i = 0
        while i < len(block_hashes):
            child = node.children.get(block_hashes[i])
            if child is None:
                break
            k = self._common_length(child, block_hashes, i)
            if k < len(child.block_hashes):
                child = self._split(child, k)
            child.last_access = now
            child.hit_count += 1
            self._refresh(child)
            matched.extend(child.block_ids)
            node = child
            i += k
        return MatchResult(block_ids=matched, node=node, num_blocks=len(matched))

    def insert(
        self,
        block_hashes: Sequence[int],
        token_ids: Sequence[int],
        block_ids: Sequence[int],
    ) -> InsertResult:
        """Add a path of full blocks; adopt (pool.touch) only the blocks the tree lacked.

        Where the tree already holds a hash, its own block id wins and the caller's block is
        not referenced by the tree: the caller frees its duplicate as usual.
        """
        n = len(block_hashes)
        size = self._block_size
        if len(block_ids) != n:
            raise ValueError(f"{n} block hashes but {len(block_ids)} block ids")
        if len(token_ids) != n * size:
            raise ValueError(f"{n} blocks of {size} tokens need {n * size} token ids, got {len(token_ids)}")
        now = self._tick()
        node = self._root
        canonical: list[int] = []
        i = 0
        while i < n:
            child = node.children.get(block_hashes[i])
            if child is None:
                new = self._add_leaf(node, block_hashes[i:], token_ids[i * size :], block_ids[i:], now)
                canonical.extend(new.block_ids)
                return InsertResult(node=new, block_ids=canonical, num_new_blocks=n - i)
            k = self._common_length(child, block_hashes, i)
            if k < len(child.block_hashes):
                child = self._split(child, k)
            child.last_access = now
            self._refresh(child)
            canonical.extend(child.block_ids)
            node = child
            i += k
        return InsertResult(node=node, block_ids=canonical, num_new_blocks=0)

    # ---- locks -----------------------------------------------------------------------

    def lock(self, node: Node) -> None:
        """Protect the path from the root to `node` from eviction (not a pool reference).

        A request that inserts its new blocks should lock the returned node before unlocking
        the node it matched, so its prefix is never evictable in between.
        """
        path = self._path_to_root(node)
        node.direct_locks += 1
        for n in path:
            self._add_lock_ref(n, 1)

    def unlock(self, node: Node) -> None:
        """Release one lock taken with lock(node)."""
        path = self._path_to_root(node)
        if node.direct_locks == 0:
            raise ValueError(f"unlock without a matching lock on {node!r}")
        node.direct_locks -= 1
        for n in path:
            self._add_lock_ref(n, -1)

    # ---- eviction --------------------------------------------------------------------

    def evict(self, num_blocks: int) -> int:
        """Evict until `num_blocks` blocks went back to the pool's free list, or nothing is left
        to evict; return how many went back.

        A block the tree drops while someone else still references it is not counted: it
        reaches the free list when that holder frees it.
        """
        freed, removed = self._evict(num_blocks)
        if removed:
            self._emit(BlockRemoved(tuple(removed)))
        return freed

    def clear(self) -> int:
        """Evict every unlocked block; return how many went back to the pool's free list.

        Emits AllBlocksCleared when the tree ends up empty (even if it already was: the event
        is idempotent and lets a subscriber that lost events resync); otherwise one
        BlockRemoved for what was evicted.
        """
        freed, removed = self._evict(sys.maxsize)
        if self._num_cached_blocks == 0:
            self._emit(AllBlocksCleared())
        elif removed:
            self._emit(BlockRemoved(tuple(removed)))
        return freed

    def _evict(self, num_blocks: int) -> tuple[int, list[int]]:
        freed = 0
        removed: list[int] = []
        size = self._block_size
        while freed < num_blocks and self._evictable:
            _, seq = self._evictable[0]
            node = self._evictable_nodes[seq]
            first_hash = node.block_hashes[0]
            cut = max(0, len(node.block_ids) - (num_blocks - freed))
            # Tail first: what stays is still a prefix of the run, so the node stays valid.
            ids = node.block_ids[cut:]
            removed.extend(reversed(node.block_hashes[cut:]))
            del node.block_ids[cut:]
            del node.block_hashes[cut:]
            del node.token_ids[cut * size :]
            self._num_cached_blocks -= len(ids)
            self._num_evictable_blocks -= len(ids)
            self._tree_block_ids.difference_update(ids)
            freed += len(self._pool.free(reversed(ids)))
            if node.block_ids:
                self._refresh(node)
            else:
                self._detach(node, first_hash)
        return freed, removed

    # ---- integrity -------------------------------------------------------------------

    def check_integrity(self, verify_hashes: bool = False) -> None:
        """Raise IntegrityError if any invariant of the tree is broken (see radix_integrity).

        With `verify_hashes`, every block except the first of a sequence is re-hashed from
        its tokens and its predecessor's hash (block 0's model/salt extra is not stored).
        """
        check_radix_tree(
            self._root,
            pool=self._pool,
            block_size=self._block_size,
            policy=self._policy,
            evictable=self._evictable,
            evictable_nodes=self._evictable_nodes,
            num_cached_blocks=self._num_cached_blocks,
            num_evictable_blocks=self._num_evictable_blocks,
            tree_block_ids=self._tree_block_ids,
            verify_hashes=verify_hashes,
        )

    # ---- internals -------------------------------------------------------------------

    def _tick(self) -> int:
        self._clock += 1
        self._root.last_access = self._clock
        return self._clock

    @staticmethod
    def _common_length(node: Node, block_hashes: Sequence[int], start: int) -> int:
        """How many leading blocks of `node` equal block_hashes[start:]; at least 1 because the
        caller found `node` by its first hash."""
        limit = min(len(node.block_hashes), len(block_hashes) - start)
        if node.block_hashes[:limit] == block_hashes[start : start + limit]:
            return limit  # the usual case, compared in C: a long cached prefix matches whole
        k = 1
        while k < limit and node.block_hashes[k] == block_hashes[start + k]:
            k += 1
        return k

    def _split(self, node: Node, k: int) -> Node:
        """Cut `node` after its k-th block; return the new upper part.

        The lower part keeps the original object (and its direct locks) because callers may
        hold it. The upper part's lock_ref equals the lower's: lock_ref counts the locks in
        the subtree, and the upper's only child is the lower part.
        """
        parent = node.parent
        assert parent is not None, "the root is never split"
        upper = Node(
            next(self._seqs),
            parent,
            node.parent_hash,
            node.block_hashes[:k],
            node.block_ids[:k],
            node.token_ids[: k * self._block_size],
            last_access=node.last_access,
            hit_count=node.hit_count,
        )
        upper.lock_ref = node.lock_ref
        parent.children[upper.block_hashes[0]] = upper
        del node.block_hashes[:k]
        del node.block_ids[:k]
        del node.token_ids[: k * self._block_size]
        node.parent = upper
        node.parent_hash = upper.block_hashes[-1]
        upper.children[node.block_hashes[0]] = node
        # Counters are unchanged (same blocks, same lock_ref); the lower node's stats changed
        # (fewer blocks), so its evictable key may have to move.
        self._refresh(node)
        return upper

    def _add_leaf(
        self,
        parent: Node,
        block_hashes: Sequence[int],
        token_ids: Sequence[int],
        block_ids: Sequence[int],
        now: int,
    ) -> Node:
        ids = list(block_ids)
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate block ids in one insert: {ids}")
        reused = self._tree_block_ids.intersection(ids)
        if reused:
            raise ValueError(f"block ids {sorted(reused)} already hold other blocks in the tree")
        self._pool.touch(ids)  # raises, leaving the tree unchanged, if a block is not allocated
        parent_hash = parent.block_hashes[-1] if parent is not self._root else None
        new = Node(
            next(self._seqs),
            parent,
            parent_hash,
            list(block_hashes),
            ids,
            list(token_ids),
            last_access=now,
        )
        parent.children[new.block_hashes[0]] = new
        self._num_cached_blocks += len(ids)
        self._num_evictable_blocks += len(ids)  # a new node has no locks
        self._tree_block_ids.update(ids)
        self._refresh(parent)  # no longer a leaf
        self._refresh(new)
        self._emit(
            BlockStored(
                block_hashes=tuple(new.block_hashes),
                parent_block_hash=parent_hash,
                token_ids=tuple(new.token_ids),
                block_size=self._block_size,
            )
        )
        return new

    def _detach(self, node: Node, first_hash: int) -> None:
        parent = node.parent
        assert parent is not None
        del parent.children[first_hash]
        node.parent = None
        self._refresh(node)
        self._refresh(parent)  # may have become an evictable leaf

    def _path_to_root(self, node: Node) -> list[Node]:
        path: list[Node] = []
        current: Node | None = node
        while current is not None and current is not self._root:
            path.append(current)
            current = current.parent
        if current is None:
            raise ValueError(f"{node!r} is not in this tree (evicted, or from another tree)")
        path.append(self._root)
        return path

    def _add_lock_ref(self, node: Node, delta: int) -> None:
        before = node.lock_ref
        node.lock_ref += delta
        if before == 0 and node.lock_ref > 0:
            self._num_evictable_blocks -= len(node.block_ids)
        elif before > 0 and node.lock_ref == 0:
            self._num_evictable_blocks += len(node.block_ids)
        self._refresh(node)

    def _refresh(self, node: Node) -> None:
        """Re-derive `node`'s entry in the evictable set from its current state."""
        if node.evict_key is not None:
            self._evictable.remove(node.evict_key)
            del self._evictable_nodes[node.seq]
            node.evict_key = None
        if node.parent is not None and not node.children and node.lock_ref == 0:
            key: EvictKey = (self._policy.priority(node.stats), node.seq)
            self._evictable.add(key)
            self._evictable_nodes[node.seq] = node
            node.evict_key = key

    def _emit(self, event: KVEvent) -> None:
        if self._events is not None:
            self._events.put(event)
