"""Chained block hashes: the published format, chaining, salt isolation, determinism."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from cache.hashing import BLOCK_HASH_SEED, BlockHasher, first_block_extra, hash_block, pack_token_ids

MODEL = "SmolLM2-135M-Instruct"

# Test vectors: computed once and pinned. The gateway, the engine and any external
# subscriber of KV events must agree on these forever; if one changes, the format changed.
VECTORS_NO_SALT = [0x152BA5CEA3D60D6D, 0x8189B89AE9848782, 0x63CBFBB885D2025F]
VECTORS_SALT_TENANT_A = [0x7376239E8A2EB8DD, 0x42C1A0F06CE68213, 0xCFAF60A427882CFA]
VECTORS_SALT_EMPTY = [0x9799C69FC9A330D4, 0x6EB205C75A5BE3C9, 0xDAF95167BEAB504E]


def test_seed_is_pinned() -> None:
    assert BLOCK_HASH_SEED == 0x7072656669786774


def test_first_block_extra_encoding_is_pinned() -> None:
    assert first_block_extra("m", None) == b"PGH1\x01\x00\x00\x00m\x00"
    assert first_block_extra("m", "") == b"PGH1\x01\x00\x00\x00m\x01\x00\x00\x00\x00"
    assert first_block_extra("mé", "s") == b"PGH1\x03\x00\x00\x00m\xc3\xa9\x01\x01\x00\x00\x00s"


def test_hash_block_vectors() -> None:
    assert hash_block(0, []) == 0xFFC96916F469E472
    assert hash_block(0, [1, 2, 3, 4], first_block_extra(MODEL, None)) == 0x93FA25FF65760A23
    assert hash_block(0xFFFF_FFFF_FFFF_FFFF, [0xFFFF_FFFF, 0]) == 0xBC72A6FF10AFC3C2


def test_block_hasher_vectors() -> None:
    hasher = BlockHasher(MODEL, 4)
    tokens = list(range(12))
    assert hasher.hashes(tokens) == VECTORS_NO_SALT
    assert hasher.hashes(tokens, cache_salt="tenant-a") == VECTORS_SALT_TENANT_A
    assert hasher.hashes(tokens, cache_salt="") == VECTORS_SALT_EMPTY


def test_format_from_first_principles() -> None:
    """The documented byte layout, built by hand with struct, gives the same hashes."""
    tokens = list(range(12))
    extra = first_block_extra(MODEL, None)
    parent = 0
    expected = []
    for i in range(3):
        payload = struct.pack("<Q", parent) + struct.pack("<4I", *tokens[4 * i : 4 * i + 4])
        payload += extra if i == 0 else b""
        parent = xxhash.xxh3_64_intdigest(payload, seed=BLOCK_HASH_SEED)
        expected.append(parent)
    assert BlockHasher(MODEL, 4).hashes(tokens) == expected


def test_hasher_agrees_with_hash_block() -> None:
    hasher = BlockHasher(MODEL, 3)
    tokens = [5, 9, 1, 0, 2, 7, 7, 7, 7]
    hashes = hasher.hashes(tokens, cache_salt="x")
    h0 = hash_block(0, tokens[0:3], first_block_extra(MODEL, "x"))
    h1 = hash_block(h0, tokens[3:6])
    h2 = hash_block(h1, tokens[6:9])
    assert hashes == [h0, h1, h2]


@settings(max_examples=100, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 2**32 - 1), max_size=60),
    steps=st.lists(st.integers(0, 15), min_size=1, max_size=5),
    packed_len=st.integers(0, 60),
    salt=st.one_of(st.none(), st.text(max_size=4)),
)
def test_extend_in_steps_equals_hashes_at_once(
    tokens: list[int], steps: list[int], packed_len: int, salt: str | None
) -> None:
    # The engine grows a request's hashes block by block, from its packed prompt where the
    # blocks lie inside it and from the id list past it: same hashes as one call.
    hasher = BlockHasher(MODEL, 4)
    packed = pack_token_ids(tokens[:packed_len])
    grown: list[int] = []
    target = 0
    for step in steps:
        target = min(target + step, len(tokens) // 4)
        hasher.extend(grown, tokens, target, salt, packed)
        assert len(grown) == target
    assert grown == hasher.hashes(tokens, salt)[:target]


def test_extend_rejects_more_blocks_than_tokens() -> None:
    hasher = BlockHasher(MODEL, 4)
    with pytest.raises(ValueError):
        hasher.extend([], list(range(7)), 2)
    with pytest.raises(ValueError):
        hasher.hashes(list(range(7)), known=[1, 2])


def test_partial_trailing_block_ignored() -> None:
    hasher = BlockHasher(MODEL, 4)
    assert hasher.hashes([*range(12), 99, 98]) == VECTORS_NO_SALT
    assert hasher.hashes([1, 2, 3]) == []
    assert hasher.hashes([]) == []


def test_changing_block_zero_changes_every_later_hash() -> None:
    hasher = BlockHasher(MODEL, 4)
    tokens = list(range(40))
    changed = [1000, *tokens[1:]]
    a, b = hasher.hashes(tokens), hasher.hashes(changed)
    assert all(x != y for x, y in zip(a, b, strict=True))


@settings(max_examples=200, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 2**32 - 1), min_size=4, max_size=40),
    position=st.integers(0, 39),
    delta=st.integers(1, 1000),
)
def test_change_anywhere_changes_that_block_and_all_later(
    tokens: list[int], position: int, delta: int
) -> None:
    hasher = BlockHasher(MODEL, 4)
    position %= len(tokens)
    changed = list(tokens)
    changed[position] = (changed[position] + delta) % 2**32
    a, b = hasher.hashes(tokens), hasher.hashes(changed)
    first_changed = position // 4
    assert a[:first_changed] == b[:first_changed]
    assert all(x != y for x, y in zip(a[first_changed:], b[first_changed:], strict=True))


@settings(max_examples=200, deadline=None)
@given(salt_a=st.one_of(st.none(), st.text(max_size=8)), salt_b=st.one_of(st.none(), st.text(max_size=8)))
def test_salts_isolate(salt_a: str | None, salt_b: str | None) -> None:
    hasher = BlockHasher(MODEL, 4)
    tokens = list(range(8))
    a, b = hasher.hashes(tokens, salt_a), hasher.hashes(tokens, salt_b)
    if salt_a == salt_b:
        assert a == b
    else:
        assert a[0] != b[0]
        assert a[1] != b[1]


def test_none_salt_differs_from_empty_salt() -> None:
    assert VECTORS_NO_SALT[0] != VECTORS_SALT_EMPTY[0]
    assert first_block_extra(MODEL, None) != first_block_extra(MODEL, "")


def test_model_id_matters() -> None:
    tokens = list(range(8))
    assert BlockHasher("a", 4).hashes(tokens) != BlockHasher("b", 4).hashes(tokens)
    # Length prefixes keep the (model, salt) split unambiguous.
    assert first_block_extra("ab", "c") != first_block_extra("a", "bc")


@settings(max_examples=200, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 50), max_size=60),
    cut=st.integers(0, 60),
    salt=st.one_of(st.none(), st.just("s")),
)
def test_known_reuse_matches_full_hash(tokens: list[int], cut: int, salt: str | None) -> None:
    hasher = BlockHasher(MODEL, 4)
    full = hasher.hashes(tokens, cache_salt=salt)
    prefix = hasher.hashes(tokens[: min(cut, len(tokens))], cache_salt=salt)
    assert hasher.hashes(tokens, cache_salt=salt, known=prefix) == full


def test_known_longer_than_full_blocks_rejected() -> None:
    hasher = BlockHasher(MODEL, 4)
    with pytest.raises(ValueError, match="known"):
        hasher.hashes([1, 2, 3, 4], known=[1, 2])


def test_numpy_and_list_inputs_agree() -> None:
    hasher = BlockHasher(MODEL, 4)
    tokens = list(range(100, 120))
    expected = hasher.hashes(tokens)
    for dtype in (np.int64, np.int32, np.uint32, np.dtype(">u4")):
        assert hasher.hashes(np.array(tokens, dtype=dtype)) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [[-1, 0, 0, 0], [2**32, 0, 0, 0], [0.5, 0, 0, 0]])
def test_invalid_token_ids_rejected(bad: list[float]) -> None:
    with pytest.raises((ValueError, OverflowError)):
        BlockHasher(MODEL, 4).hashes(bad)  # type: ignore[arg-type]


def test_invalid_block_size_rejected() -> None:
    with pytest.raises(ValueError):
        BlockHasher(MODEL, 0)


def test_long_prompt_is_fast_enough() -> None:
    """10K tokens hash well under the per-request budget (loose bound for slow CI)."""
    import time

    hasher = BlockHasher(MODEL, 16)
    tokens = list(np.random.default_rng(0).integers(0, 50_000, size=10_000))
    start = time.perf_counter()
    for _ in range(10):
        hashes = hasher.hashes(tokens)
    elapsed = (time.perf_counter() - start) / 10
    assert len(hashes) == 625
    assert elapsed < 0.05


def test_deterministic_across_processes() -> None:
    """A fresh interpreter (with its own hash() randomization) produces the same hashes."""
    code = (
        "import json, sys\n"
        "from cache.hashing import BlockHasher\n"
        f"h = BlockHasher({MODEL!r}, 4)\n"
        "print(json.dumps([h.hashes(list(range(12))), h.hashes(list(range(12)), 'tenant-a')]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": ""},
    )
    assert json.loads(result.stdout) == [VECTORS_NO_SALT, VECTORS_SALT_TENANT_A]
