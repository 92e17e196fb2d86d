"""Triton KV store, decode and extend attention against the pure-torch oracle.

Every check draws fresh random inputs (the seed is in the failure message), poisons every
cache slot no sequence owns with NaN, so that an unmasked read shows up, and poisons the
output, so that an unwritten row shows up.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from kernels.attention_ref import paged_attention_ref, store_kv
from kernels.metadata import AttentionMetadata
from testkit.numerics import DEVICE, FP32_TOLERANCE, HALF_TOLERANCE, fresh_generator, relative_error

pytestmark = pytest.mark.gpu
triton = pytest.importorskip("triton")

from kernels.backend import TritonAttention  # noqa: E402
from kernels.triton_decode import paged_decode_triton  # noqa: E402
from kernels.triton_store import store_kv_triton  # noqa: E402


def shape_id(shape: tuple) -> str:
    heads, kv_heads, head_dim, block_size, dtype = shape
    return f"{heads}q{kv_heads}kv-d{head_dim}-b{block_size}-{str(dtype).removeprefix('torch.')}"


def tolerance(dtype: torch.dtype) -> float:
    return FP32_TOLERANCE if dtype == torch.float32 else HALF_TOLERANCE


class PagedBatch:
    """A flat batch over a NaN-poisoned paged cache with shuffled block tables.

    The cached prefix of every sequence is already stored; the new tokens' K/V are in
    self.key / self.value, for the backend under test to store.
    """

    def __init__(
        self,
        query_lens: Sequence[int],
        seq_lens: Sequence[int],
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        dtype: torch.dtype,
        gen: torch.Generator,
    ) -> None:
        self.dtype = dtype
        blocks_needed = [-(-n // block_size) for n in seq_lens]
        num_blocks = sum(blocks_needed) + 3
        order = torch.randperm(num_blocks, generator=gen).tolist()
        # One spare block pads the tables: it holds only NaN, as a stale table entry would.
        pad_block = order.pop()
        tables = []
        for count in blocks_needed:
            tables.append([order.pop() for _ in range(count)])
        width = max(blocks_needed) + 1
        table = torch.tensor([t + [pad_block] * (width - len(t)) for t in tables], dtype=torch.int32)
        shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
        self.cache = torch.full(shape, float("nan"), dtype=dtype)

        def randn(*size: int) -> torch.Tensor:
            return torch.randn(*size, generator=gen).to(dtype)

        def slots(blocks: list[int], positions: range) -> list[int]:
            return [blocks[p // block_size] * block_size + p % block_size for p in positions]

        new_slots: list[int] = []
        for blocks, q, n in zip(tables, query_lens, seq_lens, strict=True):
            prefix = slots(blocks, range(n - q))
            if prefix:
                index = torch.tensor(prefix, dtype=torch.int64)
                store_kv(
                    randn(len(prefix), num_kv_heads, head_dim),
                    randn(len(prefix), num_kv_heads, head_dim),
                    self.cache,
                    index,
                )
            new_slots.extend(slots(blocks, range(n - q, n)))
        total = sum(query_lens)
        self.query = randn(total, num_heads, head_dim)
        self.key = randn(total, num_kv_heads, head_dim)
        self.value = randn(total, num_kv_heads, head_dim)
        starts = [0]
        for q in query_lens:
            starts.append(starts[-1] + q)
        self.metadata = AttentionMetadata(
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            seq_lens=torch.tensor(list(seq_lens), dtype=torch.int32),
            block_tables=table,
            slot_mapping=torch.tensor(new_slots, dtype=torch.int64),
            query_lens_host=tuple(query_lens),
            seq_lens_host=tuple(seq_lens),
            block_size=block_size,
        )
        self.scale = head_dim**-0.5

    def reference(self) -> torch.Tensor:
        """float32 attention over a float32 copy of the same (rounded) inputs, on the CPU."""
        cache = self.cache.float()
        store_kv(self.key.float(), self.value.float(), cache, self.metadata.slot_mapping)
        return paged_attention_ref(self.query.float(), cache, self.metadata, self.scale)

    def to(self, device: str) -> PagedBatch:
        m = self.metadata
        self.metadata = AttentionMetadata(
            query_start_loc=m.query_start_loc.to(device),
            seq_lens=m.seq_lens.to(device),
            block_tables=m.block_tables.to(device),
            slot_mapping=m.slot_mapping.to(device),
            query_lens_host=m.query_lens_host,
            seq_lens_host=m.seq_lens_host,
            block_size=m.block_size,
        )
        self.cache, self.query = self.cache.to(device), self.query.to(device)
        self.key, self.value = self.key.to(device), self.value.to(device)
        return self


def run_backend(batch: PagedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(TritonAttention output on the CPU, float32 reference), after a finiteness check."""
    reference = batch.reference()
    batch.to(DEVICE)
    backend = TritonAttention()
    backend.store(batch.key, batch.value, batch.cache, batch.metadata.slot_mapping)
    out = backend.attend(batch.query, batch.cache, batch.metadata, batch.scale)
    out = out.cpu()
    assert torch.isfinite(out).all(), "NaN/inf: a poisoned slot was read or a row left unwritten"
    return out, reference


# --- KV store -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_kv_heads", "head_dim", "block_size", "dtype"),
    [
        (8, 128, 16, torch.bfloat16),
        (3, 64, 16, torch.float16),
        (1, 64, 32, torch.float32),
        (32, 128, 16, torch.bfloat16),  # more than one program per token
    ],
)
def test_store_kv_writes_exactly_the_reference_slots(num_kv_heads, head_dim, block_size, dtype) -> None:
    gen, seed = fresh_generator()
    num_blocks, tokens = 40, 300
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    slot_mapping = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    # key/value as the model makes them: strided views of one fused qkv projection.
    fused = torch.randn(tokens, 3, num_kv_heads, head_dim, generator=gen).to(dtype)
    key, value = fused[:, 1], fused[:, 2]
    expected = cache.clone()
    store_kv(key, value, expected, slot_mapping)
    ours = cache.to(DEVICE)
    store_kv_triton(key.to(DEVICE), value.to(DEVICE), ours, slot_mapping.to(DEVICE))
    assert torch.equal(ours.cpu(), expected), f"seed {seed}"


def test_store_kv_skips_negative_slots() -> None:
    gen, seed = fresh_generator()
    cache = torch.randn(2, 4, 16, 2, 64, generator=gen)
    key, value = torch.randn(3, 2, 64, generator=gen), torch.randn(3, 2, 64, generator=gen)
    slots = torch.tensor([5, -1, 40])
    expected = cache.clone()
    store_kv(key[[0, 2]], value[[0, 2]], expected, slots[[0, 2]])
    ours = cache.to(DEVICE)
    store_kv_triton(key.to(DEVICE), value.to(DEVICE), ours, slots.to(DEVICE))
    assert torch.equal(ours.cpu(), expected), f"seed {seed}"


# --- decode -----------------------------------------------------------------------------------

SHORT_LENS = [1, 2, 15, 16, 17, 31, 32, 33, 64, 65, 100, 127]
LONG_LENS = [1, 17, 300, 1000, 4097, 6000, 8192, 33]

DECODE_SHAPES = [
    # (heads, kv_heads, head_dim, block_size, dtype)
    pytest.param(*shape, id=shape_id(shape))
    for shape in [
        (32, 32, 128, 16, torch.bfloat16),  # ratio 1
        (9, 3, 64, 16, torch.bfloat16),  # SmolLM2: ratio 3, padded group
        (32, 8, 128, 16, torch.float16),  # Llama-3-8B: ratio 4
        (32, 4, 128, 16, torch.bfloat16),  # ratio 8
        (16, 4, 64, 32, torch.float32),
        (12, 4, 64, 64, torch.bfloat16),  # ratio 3, large pages
        (8, 1, 256, 16, torch.float16),  # ratio 8, largest head
    ]
]


@pytest.mark.parametrize("lens", [SHORT_LENS, LONG_LENS], ids=["short", "long"])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "block_size", "dtype"), DECODE_SHAPES)
def test_decode_matches_reference(lens, heads, kv_heads, head_dim, block_size, dtype) -> None:
    gen, seed = fresh_generator()
    batch = PagedBatch([1] * len(lens), lens, heads, kv_heads, head_dim, block_size, dtype, gen)
    assert batch.metadata.is_pure_decode
    out, reference = run_backend(batch)
    error = relative_error(out, reference)
    assert error < tolerance(dtype), f"seed {seed}: relative error {error:.2e}"


@pytest.mark.parametrize(
    ("num_splits", "host_max_seq_len"),
    [(1, None), (2, None), (3, None), (7, None), (64, None), (None, None), (None, 32768)],
    ids=["1", "2", "3", "7", "64", "auto", "auto-sized-for-32k"],
)
def test_decode_any_split_count_gives_the_same_attention(num_splits, host_max_seq_len) -> None:
    """Forced split counts, and a launch sized for a longer context than the batch has (as a
    CUDA graph captured for the longest allowed context is)."""
    gen, seed = fresh_generator()
    lens = [1, 16, 17, 129, 700, 2049]
    batch = PagedBatch([1] * len(lens), lens, 32, 8, 128, 16, torch.bfloat16, gen)
    store_kv(batch.key, batch.value, batch.cache, batch.metadata.slot_mapping)
    reference = batch.reference()
    batch.to(DEVICE)
    m = batch.metadata
    out = torch.full_like(batch.query, float("nan"))
    paged_decode_triton(
        batch.query,
        batch.cache,
        m.block_tables,
        m.seq_lens,
        host_max_seq_len or m.max_seq_len,
        batch.scale,
        out,
        num_splits=num_splits,
    )
    out = out.cpu()
    assert torch.isfinite(out).all(), f"seed {seed}"
    error = relative_error(out, reference)
    assert error < HALF_TOLERANCE, f"seed {seed}: relative error {error:.2e}"


# --- extend (prefill chunks, with decodes mixed in) --------------------------------------------


def mixed_lens(gen: torch.Generator, count: int, max_chunk: int) -> tuple[list[int], list[int]]:
    """Decodes of 1 token and chunks of 1-max_chunk tokens on cached prefixes of 0-2000 tokens."""
    query_lens, seq_lens = [], []
    for _ in range(count):
        kind = torch.randint(0, 3, (1,), generator=gen).item()
        q = 1 if kind == 0 else int(torch.randint(1, max_chunk + 1, (1,), generator=gen))
        prefix = 0 if kind == 2 else int(torch.randint(0, 2001, (1,), generator=gen))
        query_lens.append(q)
        seq_lens.append(prefix + q)
    return query_lens, seq_lens


EXTEND_SHAPES = [
    pytest.param(*shape, id=shape_id(shape))
    for shape in [
        (32, 32, 128, 16, torch.bfloat16),
        (9, 3, 64, 16, torch.bfloat16),
        (32, 8, 128, 16, torch.float16),
        (32, 4, 128, 16, torch.bfloat16),
        (16, 4, 64, 16, torch.float32),
        (12, 4, 64, 64, torch.float16),
        (8, 1, 256, 32, torch.bfloat16),
    ]
]


# Long chunks take the 128-row tiles, short ones (and decode-heavy batches) the 64-row tiles.
@pytest.mark.parametrize("max_chunk", [300, 24], ids=["chunks-to-300", "chunks-to-24"])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "block_size", "dtype"), EXTEND_SHAPES)
def test_mixed_batch_matches_reference(heads, kv_heads, head_dim, block_size, dtype, max_chunk) -> None:
    gen, seed = fresh_generator()
    query_lens, seq_lens = mixed_lens(gen, 10, max_chunk)
    # Always a decode, a whole prompt, and chunks ending at and around block boundaries.
    query_lens += [1, 17, 15, 16, 17, 1]
    seq_lens += [2001, 17, 47, 32, 49, 1]
    batch = PagedBatch(query_lens, seq_lens, heads, kv_heads, head_dim, block_size, dtype, gen)
    assert not batch.metadata.is_pure_decode
    out, reference = run_backend(batch)
    error = relative_error(out, reference)
    assert error < tolerance(dtype), f"seed {seed} {query_lens} {seq_lens}: relative error {error:.2e}"
    # Per-sequence check too: one bad short sequence can hide in the norm of a long one.
    start = 0
    for q, n in zip(query_lens, seq_lens, strict=True):
        part = relative_error(out[start : start + q], reference[start : start + q])
        assert part < 3 * tolerance(dtype), f"seed {seed}: sequence q={q} len={n} error {part:.2e}"
        start += q


def test_long_prompt_in_one_chunk_matches_reference() -> None:
    gen, seed = fresh_generator()
    batch = PagedBatch([3000, 1], [4000, 4000], 32, 8, 128, 16, torch.bfloat16, gen)
    out, reference = run_backend(batch)
    error = relative_error(out, reference)
    assert error < HALF_TOLERANCE, f"seed {seed}: relative error {error:.2e}"
