"""Blocks for requests: prefix matching, allocation with eviction, commit, release, dedup.

Reference counts tell who holds a block: the radix tree holds one reference on each block
it caches, and each request holds one on each entry of its block table. A request keeps
the deepest tree node it uses locked, so nothing on its path is evicted under it.
"""

from __future__ import annotations

from collections.abc import Iterable

from cache.block_pool import BlockPool, IntegrityError
from cache.hashing import BlockHasher
from cache.radix_hashes import read_cached_hashes
from cache.radix_tree import RadixCache
from engine.request import Request


class KVCacheManager:
    def __init__(self, pool: BlockPool, hasher: BlockHasher, tree: RadixCache | None) -> None:
        self.pool = pool
        self.hasher = hasher
        self.block_size = hasher.block_size
        self.tree = tree  # None when prefix caching is off
        # In-flight dedup: hash of a prompt block some running request is computing -> its id.
        self._inflight: dict[int, str] = {}
        self._claims: dict[str, list[int]] = {}

    # -- sizes -------------------------------------------------------------------------
    @property
    def num_available_blocks(self) -> int:
        """Free blocks plus cached blocks no request holds (evictable on demand)."""
        evictable = self.tree.num_evictable_blocks if self.tree is not None else 0
        return self.pool.num_free + evictable

    def blocks_needed(self, request: Request, num_new_tokens: int) -> int:
        total = -(-(request.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, total - len(request.block_ids))

    # -- prefix matching ---------------------------------------------------------------
    def _hashes(self, request: Request, num_blocks: int) -> list[int]:
        hashes = request.block_hashes
        if len(hashes) < num_blocks:
            token_ids, salt, packed = request.token_ids, request.cache_salt, request.packed_prompt

            def extend(hashes: list[int], up_to: int) -> None:
                self.hasher.extend(hashes, token_ids, up_to, salt, packed)

            if not hashes and self.tree is not None and isinstance(token_ids, list):
                # Blocks the tree holds are read from it: one hash computed per node. (The
                # simulators' numpy ids would compare elementwise with a node's list: those
                # are hashed block by block.)
                read_cached_hashes(self.tree, hashes, token_ids, num_blocks, extend)
            extend(hashes, num_blocks)
        return hashes if len(hashes) == num_blocks else hashes[:num_blocks]

    def _max_matchable_blocks(self, request: Request) -> int:
        # At least the last token is always computed: its logits give the next token.
        return (request.num_tokens - 1) // self.block_size

    def peek_cached_tokens(self, request: Request) -> int:
        """How many of the request's tokens the cache holds now (for queue ordering)."""
        if self.tree is None:
            return 0
        match = self.tree.match_prefix(self._hashes(request, self._max_matchable_blocks(request)))
        return match.num_blocks * self.block_size

    def match(self, request: Request) -> int:
        """Adopt the longest cached prefix for a request with no blocks; returns its tokens."""
        assert not request.block_ids and request.num_computed_tokens == 0
        if self.tree is None:
            return 0
        match = self.tree.match_prefix(self._hashes(request, self._max_matchable_blocks(request)))
        if match.num_blocks == 0:
            return 0
        self.pool.touch(match.block_ids)
        self.tree.lock(match.node)
        request.block_ids = list(match.block_ids)
        request.tree_node = match.node
        request.num_tree_blocks = match.num_blocks
        request.num_computed_tokens = match.num_blocks * self.block_size
        return request.num_computed_tokens

    def extend_match(self, request: Request) -> int:
        """Adopt blocks another request finished since this one matched; returns tokens gained.

        Only at a block boundary, when the request holds no uncommitted block of its own.
        """
        if self.tree is None or request.num_computed_tokens % self.block_size:
            return 0
        have = request.num_computed_tokens // self.block_size
        if have != len(request.block_ids) or have != request.num_tree_blocks:
            return 0
        hashes = self._hashes(request, self._max_matchable_blocks(request))
        if len(hashes) <= have:
            return 0
        match = self.tree.match_prefix(hashes)
        if match.num_blocks <= have:
            return 0
        new_blocks = match.block_ids[have:]
        self.pool.touch(new_blocks)
        request.block_ids.extend(new_blocks)
        self._relock(request, match.node, match.num_blocks)
        gained = (match.num_blocks - have) * self.block_size
        request.num_computed_tokens += gained
        return gained

    # -- in-flight dedup ---------------------------------------------------------------
    def waits_for_another(self, request: Request) -> bool:
        """True when the next block this request would compute is being computed by another."""
        if self.tree is None or request.num_computed_tokens % self.block_size:
            return False
        next_block = request.num_computed_tokens // self.block_size
        if next_block >= self._max_matchable_blocks(request):
            return False
        owner = self._inflight.get(self._hashes(request, next_block + 1)[next_block])
        return owner is not None and owner != request.request_id

    def claim(self, request: Request) -> None:
        """Mark the prompt blocks this request will compute, so others wait instead of redoing them."""
        if self.tree is None:
            return
        first = request.num_computed_tokens // self.block_size
        hashes = self._hashes(request, self._max_matchable_blocks(request))
        claimed = self._claims.setdefault(request.request_id, [])
        for block_hash in hashes[first:]:
            if block_hash not in self._inflight:
                self._inflight[block_hash] = request.request_id
                claimed.append(block_hash)

    def _drop_claims(self, request: Request, only_committed: bool) -> None:
        claimed = self._claims.get(request.request_id)
        if not claimed:
            return
        committed = set(request.block_hashes[: request.num_tree_blocks]) if only_committed else None
        keep = []
        for block_hash in claimed:
            if committed is None or block_hash in committed:
                if self._inflight.get(block_hash) == request.request_id:
                    del self._inflight[block_hash]
            else:
                keep.append(block_hash)
        if keep:
            self._claims[request.request_id] = keep
        else:
            del self._claims[request.request_id]

    # -- allocation --------------------------------------------------------------------
    def allocate(self, request: Request, num_new_tokens: int, reserve: int = 0) -> bool:
        """Grow the block table to hold num_new_tokens more tokens, evicting cache if needed.

        `reserve` blocks must stay available afterwards (admission keeps room for decodes).
        """
        needed = self.blocks_needed(request, num_new_tokens)
        if needed == 0:
            return True
        if needed + reserve > self.num_available_blocks:
            return False
        shortfall = needed - self.pool.num_free
        if shortfall > 0:
            assert self.tree is not None
            self.tree.evict(shortfall)
            if self.pool.num_free < needed:
                return False
        request.block_ids.extend(self.pool.allocate(needed))
        return True

    def commit(self, request: Request) -> None:
        """Insert every newly completed full block into the tree, right away.

        Where the tree already holds a block with the same hash (computed concurrently by
        another request), the request switches to the tree's block and frees its own copy.
        """
        if self.tree is None:
            return
        # Only blocks whose tokens the host knows: an overlapped step computes the KV of a
        # token whose value is still on the device (it is hashed once it has been read).
        full = min(
            request.num_computed_tokens // self.block_size,
            len(request.block_ids),
            len(request.token_ids) // self.block_size,
        )
        if full <= request.num_tree_blocks:
            return
        hashes = self._hashes(request, full)
        result = self.tree.insert(
            hashes, request.token_ids[: full * self.block_size], request.block_ids[:full]
        )
        for index in range(request.num_tree_blocks, full):
            canonical = result.block_ids[index]
            if canonical != request.block_ids[index]:
                self.pool.touch([canonical])
                self.pool.free([request.block_ids[index]])
                request.block_ids[index] = canonical
        self._relock(request, result.node, full)
        self._drop_claims(request, only_committed=True)

    def release(self, request: Request) -> None:
        """Give back everything the request holds: its lock, its block references, its claims."""
        if self.tree is not None and request.tree_node is not None:
            self.tree.unlock(request.tree_node)
        if request.block_ids:
            self.pool.free(request.block_ids)
        request.block_ids = []
        request.tree_node = None
        request.num_tree_blocks = 0
        request.num_computed_tokens = 0
        self._drop_claims(request, only_committed=False)

    def _relock(self, request: Request, node: object, num_tree_blocks: int) -> None:
        assert self.tree is not None
        self.tree.lock(node)  # type: ignore[arg-type]
        if request.tree_node is not None:
            self.tree.unlock(request.tree_node)
        request.tree_node = node  # type: ignore[assignment]
        request.num_tree_blocks = num_tree_blocks

    # -- integrity ---------------------------------------------------------------------
    def check_integrity(self, running: Iterable[Request]) -> None:
        """Every reference is accounted for: tree + block tables == pool ref counts."""
        self.pool.check_integrity()
        expected = [0] * self.pool.num_blocks
        if self.tree is not None:
            self.tree.check_integrity()
            stack = [self.tree.root]
            while stack:
                node = stack.pop()
                for block_id in node.block_ids:
                    expected[block_id] += 1
                stack.extend(node.children.values())
        for request in running:
            for block_id in request.block_ids:
                expected[block_id] += 1
        for block_id, count in enumerate(expected):
            actual = self.pool.ref_count(block_id)
            if actual != count:
                raise IntegrityError(f"block {block_id}: ref count {actual}, holders {count}")
        held = sum(1 for count in expected if count > 0)
        if self.pool.num_free + held != self.pool.num_blocks:
            raise IntegrityError(f"free {self.pool.num_free} + held {held} != total {self.pool.num_blocks}")
