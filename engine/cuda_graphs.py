"""Steps replayed from CUDA graphs: decode batches by batch size, one-sequence chunks by length.

A decode step, or an agent's next turn on a cached prefix, is mostly kernel launches at
small batch: replaying a captured graph turns hundreds of host-side launches into one.
Graphs need fixed addresses and launch sizes, so each bucket reads its inputs from static
buffers and padding goes to scratch blocks outside the pool: a decode batch of 5 runs the
graph of 8 with three one-token padding rows; a chunk of 100 tokens runs the graph of 128
beside a 28-token padding sequence. The decode attention grid is sized for the longest
context the engine allows (short sequences leave the extra splits idle).
"""

from __future__ import annotations

import gc
import logging
import time

import torch

from engine.batch import ForwardBatch, to_device
from engine.models.decoder import CausalLM
from kernels.metadata import AttentionMetadata

log = logging.getLogger(__name__)

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)
# Token counts of one-sequence chunks; a chunk runs the smallest bucket that holds it. A chunk
# that fills its bucket exactly leaves the padding sequence no rows (it used to take the next
# bucket: a 128-token prompt ran its matmuls on 256 rows, ~1.1 ms of an 8B model's 7.4 ms
# forward on an H200). The in-between sizes keep padding under a third of a step.
PREFILL_BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def capture_stream(device: torch.device) -> torch.cuda.Stream:
    """A stream of the engine's own for all its captures, once dead graphs are freed.

    torch keys cuBLAS workspaces by stream, and destroying a graph clears the workspaces of the
    stream it was captured on, under any other graph captured there (pytorch/pytorch#193402).
    torch.cuda.graph captures on one stream per process by default, so a graph dropped anywhere
    (an earlier engine in the same process, a timing graph) could pull the workspace from under
    this engine's graphs or a capture in progress: CUBLAS_STATUS_INTERNAL_ERROR inside a capture
    was seen once in the GPU tests (kernels/NOTES.md, v12). Collecting first frees dead engines'
    graphs now rather than in the middle of a capture.
    """
    gc.collect()
    torch.cuda.synchronize(device)
    return torch.cuda.Stream(device)


def scratch_blocks_needed(block_size: int, max_batch: int) -> int:
    """Blocks outside the pool that padding writes into: one slot per padded token."""
    return -(-max(max_batch, *PREFILL_BUCKETS) // block_size)


class DecodeGraphs:
    def __init__(
        self,
        model: CausalLM,
        kv_caches: list[torch.Tensor],
        block_size: int,
        max_model_len: int,
        max_batch: int,
        scratch_block: int,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.buckets = (*(b for b in DEFAULT_BUCKETS if b < max_batch), max_batch)
        self.scratch_block = scratch_block
        self.prefill_buckets = tuple(b for b in PREFILL_BUCKETS if b <= max_model_len)
        device = next(model.parameters()).device
        max_blocks = -(-max_model_len // block_size)
        max_tokens = max(max_batch, *self.prefill_buckets)
        rows = max(max_batch, 2)
        # Input ids, positions and slots as the rows of one tensor, as a ForwardBatch has them,
        # so one copy sets all three (each copy is ~2 us of GPU time between two steps).
        self.token_rows = torch.zeros((3, max_tokens), dtype=torch.int64, device=device)
        self.input_ids, self.positions, self.slot_mapping = self.token_rows.unbind(0)
        self.seq_lens = torch.ones(rows, dtype=torch.int32, device=device)
        self.block_tables = torch.full((rows, max_blocks), scratch_block, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        # One-sequence chunks: [0, n, bucket] (the real chunk, then the padding sequence).
        self.prefill_start_loc = torch.zeros(3, dtype=torch.int32, device=device)
        self.logits_index = torch.zeros(1, dtype=torch.int64, device=device)
        self.pad_positions = torch.arange(max_tokens, dtype=torch.int64, device=device)
        num_scratch = scratch_blocks_needed(block_size, max_batch)
        self.scratch_ids = torch.arange(
            scratch_block, scratch_block + num_scratch, dtype=torch.int32, device=device
        )
        self.scratch_slots = self.pad_positions + scratch_block * block_size
        # Padding rows' (id, position, slot): a decode row has one token at position 0 in the
        # scratch block's first slot; a padding sequence's tokens fill the scratch blocks.
        scratch_slot = scratch_block * block_size
        self.decode_padding = torch.stack(
            [torch.zeros_like(self.pad_positions), torch.zeros_like(self.pad_positions),
             torch.full_like(self.pad_positions, scratch_slot)]
        )  # fmt: skip
        self.prefill_padding = torch.stack(
            [torch.zeros_like(self.pad_positions), self.pad_positions, self.scratch_slots]
        )
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}
        self._prefill_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._prefill_logits: dict[int, torch.Tensor] = {}
        self.capture_seconds = 0.0
        self.replays = 0
        self.prefill_replays = 0

    def _metadata(self, bucket: int) -> AttentionMetadata:
        # The host mirrors only size the launch: the longest allowed context, all one-token queries.
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: bucket + 1],
            seq_lens=self.seq_lens[:bucket],
            block_tables=self.block_tables[:bucket],
            slot_mapping=self.slot_mapping[:bucket],
            query_lens_host=(1,) * bucket,
            seq_lens_host=(self.max_model_len,) * bucket,
            block_size=self.block_size,
        )

    def _forward(self, bucket: int) -> torch.Tensor:
        hidden = self.model(
            self.input_ids[:bucket], self.positions[:bucket], self.kv_caches, self._metadata(bucket)
        )
        return self.model.compute_logits(hidden)

    def _prefill_metadata(self, bucket: int) -> AttentionMetadata:
        # Host mirrors size the launch: tiles for a chunk of bucket - 1 tokens, never pure decode.
        return AttentionMetadata(
            query_start_loc=self.prefill_start_loc,
            seq_lens=self.seq_lens[:2],
            block_tables=self.block_tables[:2],
            slot_mapping=self.slot_mapping[:bucket],
            query_lens_host=(bucket - 1, 1),
            seq_lens_host=(self.max_model_len, 1),
            block_size=self.block_size,
        )

    def _prefill_forward(self, bucket: int) -> torch.Tensor:
        hidden = self.model(
            self.input_ids[:bucket], self.positions[:bucket], self.kv_caches, self._prefill_metadata(bucket)
        )
        return self.model.compute_logits(hidden.index_select(0, self.logits_index))

    @torch.inference_mode()
    def capture(self, stream: torch.cuda.Stream) -> None:
        """Capture every bucket on `stream`, the engine's own (capture_stream())."""
        started = time.perf_counter()
        pool = None
        work = [(b, True) for b in self.prefill_buckets] + [(b, False) for b in self.buckets]
        for bucket, prefill in sorted(work, reverse=True):  # the largest first, so the pool fits all
            # Consistent dummy inputs in the scratch blocks, set outside the capture.
            self.slot_mapping.copy_(self.scratch_slots[: self.slot_mapping.shape[0]])
            self.positions.copy_(self.pad_positions)
            self.seq_lens.fill_(1)
            self.block_tables[:, : self.scratch_ids.shape[0]].copy_(
                self.scratch_ids.expand(self.block_tables.shape[0], -1)
            )
            if prefill:
                self.seq_lens[:1].fill_(bucket // 2)
                self._set_prefill_rows(bucket // 2, bucket)
            forward = self._prefill_forward if prefill else self._forward
            for _ in range(2):  # compile kernels and settle the allocator before capturing
                forward(bucket)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                logits = forward(bucket)
            pool = graph.pool()
            if prefill:
                self._prefill_graphs[bucket], self._prefill_logits[bucket] = graph, logits
            else:
                self._graphs[bucket], self._logits[bucket] = graph, logits
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - started
        log.info("captured %d decode graphs in %.1f s", len(self._graphs), self.capture_seconds)

    def supports(self, batch: ForwardBatch) -> bool:
        metadata = batch.metadata
        if metadata.block_tables.shape[1] > self.block_tables.shape[1]:
            return False
        if metadata.is_pure_decode:
            return bool(self._graphs) and metadata.num_seqs <= self.buckets[-1]
        return (
            bool(self._prefill_graphs)
            and metadata.num_seqs == 1
            and metadata.query_lens_host[0] <= self.prefill_buckets[-1]
        )

    def run_any(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits of the rows that sample: every decode row, or the chunk's last token."""
        if batch.metadata.is_pure_decode:
            return self.run(batch)
        return self.run_prefill(batch)

    def _set_prefill_rows(self, count: int, bucket: int) -> None:
        """Padding sequence (bucket - count tokens in the scratch blocks) and its table row.

        With no padding rows it has no query tokens (attention's programs for it return at
        once) and one cached token, the scratch block's first slot, so no length is zero."""
        pad = bucket - count
        self.token_rows[:, count:bucket].copy_(self.prefill_padding[:, :pad])
        self.seq_lens[1:2].fill_(max(pad, 1))
        self.block_tables[1, : self.scratch_ids.shape[0]].copy_(self.scratch_ids)
        self.prefill_start_loc.copy_(
            to_device(torch.tensor([0, count, bucket], dtype=torch.int32), self.prefill_start_loc.device)
        )
        self.logits_index.fill_(count - 1)

    def run_prefill(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits [1, vocab] of the last token of a one-sequence chunk."""
        count = batch.metadata.query_lens_host[0]
        bucket = next(b for b in self.prefill_buckets if b >= count)
        width = batch.metadata.block_tables.shape[1]
        self.token_rows[:, :count].copy_(batch.token_rows, non_blocking=True)
        self.seq_lens[:1].copy_(batch.metadata.seq_lens, non_blocking=True)
        self.block_tables[:1, :width].copy_(batch.metadata.block_tables, non_blocking=True)
        self._set_prefill_rows(count, bucket)
        self._prefill_graphs[bucket].replay()
        self.prefill_replays += 1
        return self._prefill_logits[bucket]

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits of the sampling rows of a pure-decode batch: [B, vocab] when all B sample."""
        count = batch.metadata.num_seqs
        bucket = next(b for b in self.buckets if b >= count)
        width = batch.metadata.block_tables.shape[1]
        self.token_rows[:, :count].copy_(batch.token_rows, non_blocking=True)
        self.seq_lens[:count].copy_(batch.metadata.seq_lens, non_blocking=True)
        self.block_tables[:count, :width].copy_(batch.metadata.block_tables, non_blocking=True)
        if bucket > count:
            # Padding rows: one token of context in the scratch block, written there too.
            self.token_rows[:, count:bucket].copy_(self.decode_padding[:, count:bucket])
            self.seq_lens[count:bucket].fill_(1)
            self.block_tables[count:bucket, 0].fill_(self.scratch_block)
        self._graphs[bucket].replay()
        self.replays += 1
        if len(batch.sampled_chunks) < count:
            # A one-token prompt chunk that is not the prompt's last (a step budget ran out)
            # samples nothing: only the other rows' logits go to the sampler.
            return self._logits[bucket].index_select(0, batch.logits_indices)
        return self._logits[bucket][:count]
