"""The radix tree's node and the value types its operations return."""

from __future__ import annotations

from dataclasses import dataclass

from policies.eviction import NodeStats

# An entry of the sorted evictable set: (policy priority, node.seq). The seq makes keys
# unique and ties deterministic without comparing nodes.
EvictKey = tuple[tuple[int, ...], int]


class Node:
    """A run of one or more whole blocks on a path from the root.

    The lists are owned by the tree; callers read them and never mutate them. `lock_ref`
    counts the locks held on this node or anywhere below it, so a node with lock_ref 0 has
    no locked descendant and every block in its subtree may eventually be evicted.
    """

    __slots__ = (
        "block_hashes",
        "block_ids",
        "children",
        "direct_locks",
        "evict_key",
        "hit_count",
        "last_access",
        "lock_ref",
        "parent",
        "parent_hash",
        "seq",
        "token_ids",
    )

    def __init__(
        self,
        seq: int,
        parent: Node | None,
        parent_hash: int | None,
        block_hashes: list[int],
        block_ids: list[int],
        token_ids: list[int],
        last_access: int,
        hit_count: int = 0,
    ) -> None:
        self.seq = seq
        self.parent = parent
        # Hash of the block before this run (None under the root); the chain check in
        # check_integrity compares it with the parent's last hash, which catches a child
        # attached under the wrong parent.
        self.parent_hash = parent_hash
        self.block_hashes = block_hashes
        self.block_ids = block_ids
        self.token_ids = token_ids
        # Keyed by the child's first block hash: chained hashes make that key unique among
        # siblings, and salted first blocks keep tenants apart with no extra bookkeeping.
        self.children: dict[int, Node] = {}
        self.lock_ref = 0
        self.direct_locks = 0
        self.last_access = last_access
        self.hit_count = hit_count
        self.evict_key: EvictKey | None = None

    @property
    def num_blocks(self) -> int:
        return len(self.block_ids)

    @property
    def stats(self) -> NodeStats:
        return NodeStats(self.last_access, self.hit_count, len(self.block_ids))

    def __repr__(self) -> str:
        return (
            f"Node(seq={self.seq}, blocks={len(self.block_ids)}, lock_ref={self.lock_ref}, "
            f"last_access={self.last_access}, hit_count={self.hit_count})"
        )


@dataclass(frozen=True)
class MatchResult:
    """The longest cached prefix: its block ids and the node that ends exactly at it."""

    block_ids: list[int]
    node: Node
    num_blocks: int


@dataclass(frozen=True)
class InsertResult:
    """`block_ids` are the tree's ids for every inserted block (existing ones where the tree
    already held the hash); `node` ends exactly at the last inserted block."""

    node: Node
    block_ids: list[int]
    num_new_blocks: int
