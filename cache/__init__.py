"""Block hashing, the block pool, the radix prefix cache and its KV events.

Imports only the standard library, numpy, xxhash, sortedcontainers and `policies`, so the
engine core and the gateway can both use it without torch or a web stack.
"""

from cache.block_pool import BlockPool, IntegrityError, NoFreeBlocksError
from cache.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent, KVEventQueue
from cache.hashing import BLOCK_HASH_SEED, BlockHasher, first_block_extra, hash_block
from cache.prefix_index import ApplyOutcome, ApproximatePrefixIndex, PrefixIndex, ReplicaPrefixIndex
from cache.radix_node import InsertResult, MatchResult, Node
from cache.radix_tree import RadixCache

__all__ = [
    "BLOCK_HASH_SEED",
    "AllBlocksCleared",
    "ApplyOutcome",
    "ApproximatePrefixIndex",
    "BlockHasher",
    "BlockPool",
    "BlockRemoved",
    "BlockStored",
    "InsertResult",
    "IntegrityError",
    "KVEvent",
    "KVEventQueue",
    "MatchResult",
    "NoFreeBlocksError",
    "Node",
    "PrefixIndex",
    "RadixCache",
    "ReplicaPrefixIndex",
    "first_block_extra",
    "hash_block",
]
