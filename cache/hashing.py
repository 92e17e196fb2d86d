"""Chained block hashes, computed identically by the gateway and the engine.

Format (version 1). Changing anything here changes every published hash, so the
test vectors in tests/cache/test_block_hashing.py pin it:

    h_i = xxh3_64(u64le(parent_i) || u32le(token ids of block i) || extra_i, seed=BLOCK_HASH_SEED)

with parent_0 = 0, extra_0 = first_block_extra(model_id, cache_salt) and
extra_i = b"" for i > 0. Because every hash folds in its parent, equal hashes at
block i mean equal token prefixes (and equal model and salt) up to block i; the
radix tree and the gateway's prefix index rely on that to compare prefixes by a
single integer. Only full blocks are hashed: a partial block's KV is never shared.

Python's hash() is salted per process, so it is never used: these hashes cross
process and machine boundaries in KV events.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import xxhash

# ASCII "prefixgt" read as a big-endian u64; any fixed value works, it must simply never change.
BLOCK_HASH_SEED: Final[int] = 0x7072656669786774

# Leading tag of extra_0: names the format so a future version cannot collide with this one.
_FORMAT_TAG: Final[bytes] = b"PGH1"
_NO_SALT: Final[bytes] = b"\x00"
_HAS_SALT: Final[bytes] = b"\x01"
_U32_MAX: Final[int] = 0xFFFF_FFFF
_U64_MAX: Final[int] = 0xFFFF_FFFF_FFFF_FFFF
_U32_LE: Final = np.dtype("<u4")
_U64_LE: Final = struct.Struct("<Q")
_BIG_ENDIAN_HOST: Final[bool] = sys.byteorder == "big"
assert array("I").itemsize == 4, "token ids are packed as 4-byte unsigned ints"


def _length_prefixed(text: str) -> bytes:
    data = text.encode("utf-8")
    return len(data).to_bytes(4, "little") + data


def first_block_extra(model_id: str, cache_salt: str | None) -> bytes:
    """The bytes folded into block 0's hash: the model id and the tenant's cache salt.

    Each string is length-prefixed so ("ab", "c") and ("a", "bc") differ, and a marker byte
    tells "no salt" from an empty salt, so a tenant that sends "" does not share with one
    that sends nothing.
    """
    salt = _NO_SALT if cache_salt is None else _HAS_SALT + _length_prefixed(cache_salt)
    return _FORMAT_TAG + _length_prefixed(model_id) + salt


def pack_token_ids(token_ids: Sequence[int] | np.ndarray) -> bytes:
    """Token ids as the little-endian u32 bytes the hashes read; ValueError for ids that would
    wrap (negative, past u32) or are not integers."""
    if isinstance(token_ids, np.ndarray):
        return _array_token_bytes(token_ids)
    # array("I") converts a list in C and range-checks each id: ~5x faster than np.asarray
    # on a list of Python ints, which cost ~0.25 ms of an 8k-token prompt's hashing.
    try:
        packed = array("I", token_ids)
    except (OverflowError, TypeError):
        raise ValueError("token ids must be integers that fit in an unsigned 32-bit integer") from None
    if _BIG_ENDIAN_HOST:
        packed.byteswap()
    return packed.tobytes()


def _array_token_bytes(arr: np.ndarray) -> bytes:
    if arr.size == 0:
        return b""
    if arr.ndim != 1:
        raise ValueError(f"token ids must be one-dimensional, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
    if arr.dtype != _U32_LE:
        if int(arr.min()) < 0 or int(arr.max()) > _U32_MAX:
            raise ValueError("token ids must fit in an unsigned 32-bit integer")
        arr = arr.astype(_U32_LE)
    return arr.tobytes()


def _parent_bytes(parent_hash: int) -> bytes:
    if not 0 <= parent_hash <= _U64_MAX:
        raise ValueError(f"parent hash must be an unsigned 64-bit integer, got {parent_hash}")
    return parent_hash.to_bytes(8, "little")


def hash_block(parent_hash: int, token_ids: Sequence[int], extra: bytes = b"") -> int:
    """Hash one block given its parent's hash (0 for block 0). See the module docstring."""
    data = _parent_bytes(parent_hash) + pack_token_ids(token_ids) + extra
    return xxhash.xxh3_64_intdigest(data, seed=BLOCK_HASH_SEED)


@dataclass(frozen=True)
class BlockHasher:
    """Hashes the full blocks of a token sequence for one model and block size."""

    model_id: str
    block_size: int

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")

    def hashes(
        self,
        token_ids: Sequence[int],
        cache_salt: str | None = None,
        known: Sequence[int] = (),
    ) -> list[int]:
        """Hashes of every full block of `token_ids`; a trailing partial block is ignored.

        `known` holds hashes already computed (with the same salt) for a prefix of these
        same tokens, so a request that grows by decoding only hashes its new blocks. It is
        trusted, not re-verified: passing hashes of other tokens gives wrong hashes.
        """
        out = list(map(int, known))
        self.extend(out, token_ids, len(token_ids) // self.block_size, cache_salt)
        return out

    def extend(
        self,
        hashes: list[int],
        token_ids: Sequence[int],
        num_blocks: int,
        cache_salt: str | None = None,
        packed_prefix: bytes = b"",
    ) -> None:
        """Append to `hashes` (those of the first blocks, trusted) up to `num_blocks` of them.

        `packed_prefix`, when given, is the same tokens' leading part already packed as
        u32le bytes (a validated prompt): blocks inside it are hashed from it without
        converting the ids again, the dominant cost for a long prompt after the loop itself.
        """
        size = self.block_size
        start = len(hashes)
        if start >= num_blocks:
            if start > len(token_ids) // size:
                raise ValueError(f"{start} known hashes but only {len(token_ids) // size} full blocks")
            return
        if num_blocks * size > len(token_ids):
            raise ValueError(f"{num_blocks} blocks of {size} need more than {len(token_ids)} tokens")
        width = size * 4
        if num_blocks * width <= len(packed_prefix):
            data: bytes | memoryview = memoryview(packed_prefix)[start * width : num_blocks * width]
        else:
            # One conversion for all new blocks, then byte slices: per-block numpy calls
            # would dominate the cost for long prompts.
            data = pack_token_ids(token_ids[start * size : num_blocks * size])
        if hashes:
            parent = int(hashes[-1])
            _parent_bytes(parent)  # checks a caller's hash once; the loop's own fit in u64
            first = 0
        else:  # block 0: parent 0 and the model / salt bytes
            payload = _parent_bytes(0) + bytes(data[:width]) + first_block_extra(self.model_id, cache_salt)
            first, parent = width, xxhash.xxh3_64_intdigest(payload, seed=BLOCK_HASH_SEED)
            hashes.append(parent)
        # Names bound locally and the parent packed by struct: the loop runs once a block
        # (520 times for an 8k prompt), and this halves its cost against attribute lookups.
        digest, pack_parent, append = xxhash.xxh3_64_intdigest, _U64_LE.pack, hashes.append
        seed = BLOCK_HASH_SEED
        for offset in range(first, len(data), width):
            parent = digest(pack_parent(parent) + data[offset : offset + width], seed)
            append(parent)
