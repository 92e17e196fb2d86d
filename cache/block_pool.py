"""A fixed pool of KV-cache blocks: a free list plus a reference count per block.

A block is shared by every holder that touched it (running requests, the radix tree),
and returns to the free list only when its last holder frees it. The pool knows nothing
about what a block holds; the radix tree decides what stays cached.

Reuse order is LIFO: the most recently freed block is the next one allocated, which keeps
the working set of block ids small and recently written memory warm. A fresh pool hands
out 0, 1, 2, ... in order.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable


class NoFreeBlocksError(RuntimeError):
    """Raised when an allocation asks for more blocks than are free."""


class IntegrityError(AssertionError):
    """A cache data structure broke one of its invariants (a bug, never user input)."""


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be non-negative, got {num_blocks}")
        self._num_blocks = num_blocks
        self._ref_counts = [0] * num_blocks
        # A stack: allocate pops from the end. Reversed so a fresh pool hands out 0, 1, 2...
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take `n` free blocks, each with reference count 1."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        if n > len(self._free):
            raise NoFreeBlocksError(f"asked for {n} blocks, only {len(self._free)} free")
        if n == 0:
            return []
        taken = self._free[-n:]
        del self._free[-n:]
        taken.reverse()
        for block_id in taken:
            self._ref_counts[block_id] = 1
        return taken

    def touch(self, block_ids: Iterable[int]) -> None:
        """Add one reference per occurrence; every block must already be allocated."""
        ids = list(block_ids)
        if not ids:
            return
        counts = self._ref_counts
        # Validate everything first so a bad id leaves the pool unchanged. The checks run in C
        # (min, max, map): a cached 8k-token prefix touches ~500 blocks on the way to its TTFT.
        self._check_ids(ids)
        if not all(map(counts.__getitem__, ids)):
            free = next(block_id for block_id in ids if counts[block_id] == 0)
            raise ValueError(f"cannot touch block {free}: it is free")
        for block_id in ids:
            counts[block_id] += 1

    def free(self, block_ids: Iterable[int]) -> list[int]:
        """Drop one reference per occurrence; return the blocks that went back to the free list."""
        ids = list(block_ids)
        if not ids:
            return []
        counts = self._ref_counts
        self._check_ids(ids)
        # Each block once (the usual case): every count must be at least 1. Repeats need a tally.
        if len(set(ids)) != len(ids) or not all(map(counts.__getitem__, ids)):
            for block_id, count in Counter(ids).items():
                if count > counts[block_id]:
                    raise ValueError(
                        f"cannot free block {block_id} {count} time(s): reference count is {counts[block_id]}"
                    )
        released: list[int] = []
        for block_id in ids:
            counts[block_id] -= 1
            if counts[block_id] == 0:
                released.append(block_id)
        self._free.extend(released)
        return released

    def ref_count(self, block_id: int) -> int:
        self._check_id(block_id)
        return self._ref_counts[block_id]

    def check_integrity(self) -> None:
        """Raise IntegrityError if the free list and the reference counts disagree."""
        seen: set[int] = set()
        for block_id in self._free:
            if not 0 <= block_id < self._num_blocks:
                raise IntegrityError(f"free list holds out-of-range block {block_id}")
            if block_id in seen:
                raise IntegrityError(f"block {block_id} is on the free list twice")
            seen.add(block_id)
            if self._ref_counts[block_id] != 0:
                raise IntegrityError(
                    f"free block {block_id} has reference count {self._ref_counts[block_id]}"
                )
        for block_id, count in enumerate(self._ref_counts):
            if count < 0:
                raise IntegrityError(f"block {block_id} has negative reference count {count}")
            if count == 0 and block_id not in seen:
                raise IntegrityError(f"allocated block {block_id} has reference count 0")

    def _check_ids(self, ids: list[int]) -> None:
        if min(ids) < 0 or max(ids) >= self._num_blocks:
            for block_id in ids:
                self._check_id(block_id)

    def _check_id(self, block_id: int) -> None:
        if not 0 <= block_id < self._num_blocks:
            raise ValueError(f"block id {block_id} out of range [0, {self._num_blocks})")
