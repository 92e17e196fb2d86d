"""Split-KV extend attention (short chunks over long cached prefixes) against the torch oracle.

Fresh random inputs every run (the seed is in the failure message); every cache slot no
sequence owns holds NaN, and so does the output before the call, so an unmasked read or an
unwritten row shows up as NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from kernels.attention_ref import paged_attention_ref, store_kv
from kernels.metadata import AttentionMetadata
from testkit.numerics import DEVICE, FP32_TOLERANCE, HALF_TOLERANCE, fresh_generator, relative_error

triton = pytest.importorskip("triton")

from kernels.backend import TritonAttention  # noqa: E402
from kernels.extend_split_launch import choose_extend_splits  # noqa: E402
from kernels.triton_extend import unroll_that_fits  # noqa: E402
from kernels.triton_extend_split import extend_attention  # noqa: E402


def tolerance(dtype: torch.dtype) -> float:
    return FP32_TOLERANCE if dtype == torch.float32 else HALF_TOLERANCE


class Batch:
    """Sequences over a NaN-poisoned paged cache with shuffled block tables; the new tokens'
    K/V are stored too (the backend's store kernel is tested elsewhere)."""

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
        self.query_lens, self.seq_lens = list(query_lens), list(seq_lens)
        blocks_needed = [-(-n // block_size) for n in seq_lens]
        num_blocks = sum(blocks_needed) + 2
        order = torch.randperm(num_blocks, generator=gen).tolist()
        pad_block = order.pop()  # stale table entries point at a block of NaN
        tables = [[order.pop() for _ in range(count)] for count in blocks_needed]
        width = max(blocks_needed) + 1
        self.block_tables = torch.tensor(
            [t + [pad_block] * (width - len(t)) for t in tables], dtype=torch.int32
        )
        self.cache = torch.full(
            (2, num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype
        )
        slots = [
            [blocks[p // block_size] * block_size + p % block_size for p in range(n)]
            for blocks, n in zip(tables, seq_lens, strict=True)
        ]
        all_slots = torch.tensor([s for row in slots for s in row], dtype=torch.int64)
        total_keys = all_slots.shape[0]
        store_kv(
            torch.randn(total_keys, num_kv_heads, head_dim, generator=gen).to(dtype),
            torch.randn(total_keys, num_kv_heads, head_dim, generator=gen).to(dtype),
            self.cache,
            all_slots,
        )
        self.query = torch.randn(sum(query_lens), num_heads, head_dim, generator=gen).to(dtype)
        starts = [0]
        for q in query_lens:
            starts.append(starts[-1] + q)
        self.query_start_loc = torch.tensor(starts, dtype=torch.int32)
        self.scale = head_dim**-0.5
        self.dtype = dtype
        self._reference: torch.Tensor | None = None

    def metadata(self, device: str) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=self.query_start_loc.to(device),
            seq_lens=torch.tensor(self.seq_lens, dtype=torch.int32, device=device),
            block_tables=self.block_tables.to(device),
            slot_mapping=torch.zeros(0, dtype=torch.int64, device=device),
            query_lens_host=tuple(self.query_lens),
            seq_lens_host=tuple(self.seq_lens),
            block_size=self.cache.shape[2],
        )

    def reference(self) -> torch.Tensor:
        """float32 attention over a float32 copy of the same (rounded) inputs, on the CPU."""
        if self._reference is None:
            metadata = self.metadata("cpu")
            self._reference = paged_attention_ref(
                self.query.float(), self.cache.float(), metadata, self.scale
            )
        return self._reference

    def run(
        self,
        num_splits: int | None,
        host_max_query_len: int | None = None,
        host_max_seq_len: int | None = None,
        block_m: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Our output (on the CPU; NaN-poisoned before the call) and the float32 reference."""
        reference = self.reference()
        m = self.metadata(DEVICE)
        query, cache = self.query.to(DEVICE), self.cache.to(DEVICE)
        out = torch.full_like(query, float("nan"))
        extend_attention(
            query,
            cache,
            m.block_tables,
            m.seq_lens,
            m.query_start_loc,
            m.num_seqs,
            self.scale,
            out,
            host_max_query_len or m.max_query_len,
            host_max_seq_len or m.max_seq_len,
            num_splits=num_splits,
            block_m=block_m,
        )
        return out.cpu(), reference

    def check(self, out: torch.Tensor, reference: torch.Tensor, seed: int, label: str) -> None:
        assert torch.isfinite(out).all(), (
            f"seed {seed} {label}: NaN/inf (poisoned slot read or row unwritten)"
        )
        limit = tolerance(self.dtype)
        error = relative_error(out, reference)
        assert error < limit, f"seed {seed} {label}: relative error {error:.2e}"
        # Per sequence too: a bad short sequence can hide in the norm of a long one.
        start = 0
        for q, n in zip(self.query_lens, self.seq_lens, strict=True):
            part = relative_error(out[start : start + q], reference[start : start + q])
            assert part < 3 * limit, f"seed {seed} {label}: sequence q={q} len={n} error {part:.2e}"
            start += q


SHAPES = [
    # (heads, kv_heads, head_dim, block_size, dtype): GQA 1 / 3 / 4 / 8, d64 / d128, all dtypes
    pytest.param(8, 8, 128, 16, torch.bfloat16, id="g1-d128-bf16"),
    pytest.param(9, 3, 64, 16, torch.float16, id="g3-d64-fp16"),
    pytest.param(32, 8, 128, 16, torch.bfloat16, id="g4-d128-bf16-llama8b"),
    pytest.param(32, 4, 128, 32, torch.float16, id="g8-d128-fp16-b32"),
    pytest.param(12, 4, 64, 16, torch.float32, id="g3-d64-fp32"),
    pytest.param(16, 2, 128, 64, torch.float32, id="g8-d128-fp32-b64"),
]

# (query_lens, cached prefix lengths): 1-300 new tokens on prefixes 0-16K.
BATCHES = {
    "q128-on-8k": ([128], [8192]),
    "q300-on-16k": ([300], [16000]),
    "q17-on-4k+fresh": ([17, 33], [4095, 0]),
    "mixed": ([1, 300, 16, 64, 5, 129, 2], [16383, 2000, 0, 777, 513, 4096, 31]),
}


@pytest.mark.gpu
@pytest.mark.parametrize("batch_name", list(BATCHES))
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "block_size", "dtype"), SHAPES)
def test_split_extend_matches_reference(batch_name, heads, kv_heads, head_dim, block_size, dtype) -> None:
    gen, seed = fresh_generator()
    query_lens, prefixes = BATCHES[batch_name]
    seq_lens = [p + q for p, q in zip(prefixes, query_lens, strict=True)]
    batch = Batch(query_lens, seq_lens, heads, kv_heads, head_dim, block_size, dtype, gen)
    # The heuristic's split count and tile, a forced odd split count, and 128-row split tiles.
    for splits, block_m in ((None, None), (3, None), (None, 128)):
        out, reference = batch.run(splits, block_m=block_m)
        batch.check(out, reference, seed, f"{batch_name} splits={splits} block_m={block_m}")


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 2, 3, 7, 16, 64])
def test_any_split_count_gives_the_same_attention(num_splits: int) -> None:
    """Forced split counts, including more splits than a short sequence's keys can fill."""
    gen, seed = fresh_generator()
    query_lens = [3, 128, 1, 40, 200]
    seq_lens = [q + p for q, p in zip(query_lens, [9000, 2048, 100, 0, 300], strict=True)]
    batch = Batch(query_lens, seq_lens, 32, 8, 128, 16, torch.bfloat16, gen)
    for block_m in (None, 128):
        out, reference = batch.run(num_splits, block_m=block_m)
        batch.check(out, reference, seed, f"forced {num_splits} block_m={block_m}")


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [3, 5])
def test_split_that_starts_past_some_rows(num_splits: int) -> None:
    """GQA 1 takes 64- or 128-token q-tiles: the last split of the last tile (keys 512..519)
    starts past the positions of most of its rows, which see no key there."""
    gen, seed = fresh_generator()
    batch = Batch([512], [520], 8, 8, 64, 16, torch.bfloat16, gen)
    for block_m in (None, 128):
        out, reference = batch.run(num_splits, block_m=block_m)
        batch.check(out, reference, seed, f"forced {num_splits} block_m={block_m}")


@pytest.mark.gpu
@pytest.mark.parametrize("count", [1, 100, 128, 300])
@pytest.mark.parametrize("prefix", [0, 8192])
def test_graph_shaped_launch_one_sequence_and_padding(count: int, prefix: int) -> None:
    """The launch engine/cuda_graphs.py captures: a chunk of `count` tokens beside a padding
    sequence filling the bucket, host sizes of a bucket - 1 token chunk and a 32K context."""
    gen, seed = fresh_generator()
    bucket = next(b for b in (16, 32, 64, 128, 256, 512) if b > count)
    batch = Batch(
        [count, bucket - count], [prefix + count, bucket - count], 32, 8, 128, 16, torch.bfloat16, gen
    )
    for block_m in (None, 128):
        out, reference = batch.run(None, bucket - 1, 32768, block_m)
        batch.check(out, reference, seed, f"bucket {bucket} block_m={block_m}")


@pytest.mark.gpu
def test_backend_takes_the_split_path_for_a_short_chunk_on_a_long_prefix() -> None:
    gen, seed = fresh_generator()
    batch = Batch([128], [128 + 8192], 32, 8, 128, 16, torch.bfloat16, gen)
    reference = batch.reference()
    m = batch.metadata(DEVICE)
    query, cache = batch.query.to(DEVICE), batch.cache.to(DEVICE)
    # The new tokens are already in the cache: attention alone, no store.
    out = TritonAttention().attend(query, cache, m, batch.scale).cpu()
    batch.check(out, reference, seed, "backend")


def test_split_heuristic() -> None:
    wide, narrow = (32, 128), (16, 64)  # (BLOCK_Q, BLOCK_M) at GQA 4

    def splits(tokens: int, seqs: int, max_seq_len: int, tiles=wide) -> int:
        return choose_extend_splits(tokens, seqs, 8, max_seq_len, 132, tiles, tiles)

    # Llama-8B shape on 132 SMs: 128 new tokens on an 8K prefix split into one wave...
    assert splits(128, 1, 8320) == 4
    # ...and so does the CUDA graph's launch of the same chunk (bucket 128, padding sequence).
    assert splits(128, 2, 32768) == 4
    # A fuller bucket needs fewer splits for its wave.
    assert splits(256, 2, 32768) == 2
    assert splits(32, 2, 32768, narrow) == 16
    # The default 64-row split tiles behind 128-row unsplit ones (two programs per SM).
    assert choose_extend_splits(256, 2, 8, 32768, 132, wide, narrow) == 2
    # A large prefill fills the GPU without splits; a short context has nothing to split.
    assert splits(4096, 1, 4096) == 1
    assert splits(128, 1, 511) == 1
    # Every split keeps at least 256 keys of the longest context.
    assert splits(16, 1, 1024, narrow) == 4


def test_unroll_only_where_its_copies_fit_shared_memory() -> None:
    cpu = torch.device("cpu")  # sized as Hopper's 227 KiB a program
    # The unsplit kernel's 128-row, 64-key, 2-stage tiles: two copies of the K/V buffers fit...
    assert unroll_that_fits(2, 2, 128, 64, 128, torch.bfloat16, cpu) == 2
    # ...the split kernel's 128-key, 3-stage ones do not (the compiler asked for 295,936 bytes).
    assert unroll_that_fits(2, 3, 128, 128, 128, torch.bfloat16, cpu) == 1
    # float32 tiles are twice the bytes.
    assert unroll_that_fits(2, 2, 64, 32, 256, torch.float32, cpu) == 1
