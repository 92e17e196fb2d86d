"""BlockPool: allocation, reference counting, LIFO reuse and the integrity check."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cache.block_pool import BlockPool, IntegrityError, NoFreeBlocksError


def test_fresh_pool_allocates_in_order() -> None:
    pool = BlockPool(8)
    assert (pool.num_blocks, pool.num_free) == (8, 8)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.num_free == 5
    assert [pool.ref_count(b) for b in range(4)] == [1, 1, 1, 0]
    pool.check_integrity()


def test_allocate_zero_and_too_many() -> None:
    pool = BlockPool(2)
    assert pool.allocate(0) == []
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(3)
    assert pool.num_free == 2  # a failed allocation takes nothing
    with pytest.raises(ValueError):
        pool.allocate(-1)


def test_no_free_blocks_error_is_runtime_error() -> None:
    assert issubclass(NoFreeBlocksError, RuntimeError)
    assert issubclass(IntegrityError, AssertionError)


def test_touch_and_free_count_references() -> None:
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    pool.touch([a, a, b])
    assert (pool.ref_count(a), pool.ref_count(b)) == (3, 2)
    assert pool.free([a, b]) == []
    assert pool.free([b]) == [b]
    assert pool.free([a, a]) == [a]
    assert pool.num_free == 4
    pool.check_integrity()


def test_freed_blocks_are_reused_lifo() -> None:
    pool = BlockPool(6)
    blocks = pool.allocate(4)
    pool.free([blocks[1]])
    pool.free([blocks[3]])
    assert pool.allocate(1) == [blocks[3]]
    assert pool.allocate(1) == [blocks[1]]


def test_touch_free_block_rejected() -> None:
    pool = BlockPool(3)
    (a,) = pool.allocate(1)
    with pytest.raises(ValueError, match="free"):
        pool.touch([a, 2])
    assert pool.ref_count(a) == 1  # validated before any change
    with pytest.raises(ValueError):
        pool.touch([7])


def test_double_free_rejected_atomically() -> None:
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    with pytest.raises(ValueError):
        pool.free([a, b, b])
    assert (pool.ref_count(a), pool.ref_count(b)) == (1, 1)
    pool.free([a])
    with pytest.raises(ValueError):
        pool.free([a])
    with pytest.raises(ValueError):
        pool.ref_count(3)


def test_integrity_detects_corruption() -> None:
    pool = BlockPool(4)
    pool.allocate(2)
    pool._free.append(pool._free[-1])  # duplicate on the free list
    with pytest.raises(IntegrityError, match="twice"):
        pool.check_integrity()

    pool = BlockPool(4)
    pool._ref_counts[pool._free[0]] = 1  # free block with a reference
    with pytest.raises(IntegrityError, match="free block"):
        pool.check_integrity()

    pool = BlockPool(4)
    (a,) = pool.allocate(1)
    pool._ref_counts[a] = 0  # allocated block with no reference
    with pytest.raises(IntegrityError, match="allocated block"):
        pool.check_integrity()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "touch", "free"]), st.integers(0, 5)), max_size=60))
def test_random_operations_keep_integrity(ops: list[tuple[str, int]]) -> None:
    pool = BlockPool(6)
    refs: dict[int, int] = {}
    for op, arg in ops:
        held = sorted(refs)
        if op == "alloc":
            if arg > pool.num_free:
                with pytest.raises(NoFreeBlocksError):
                    pool.allocate(arg)
                continue
            for block in pool.allocate(arg):
                assert block not in refs
                refs[block] = 1
        elif held:
            block = held[arg % len(held)]
            if op == "touch":
                pool.touch([block])
                refs[block] += 1
            else:
                released = pool.free([block])
                refs[block] -= 1
                assert released == ([block] if refs[block] == 0 else [])
                if refs[block] == 0:
                    del refs[block]
        pool.check_integrity()
        assert pool.num_free == pool.num_blocks - len(refs)
        assert all(pool.ref_count(b) == n for b, n in refs.items())
