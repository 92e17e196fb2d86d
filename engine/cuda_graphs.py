"""Decode steps replayed from CUDA graphs, one graph per bucket of batch sizes.

A decode step of a small model is mostly kernel launches; replaying a captured graph turns
hundreds of launches into one. Graphs need fixed addresses and fixed launch sizes, so each
bucket reads its inputs from static buffers, padding rows (a batch of 5 runs the graph of 8)
write their K/V into a scratch block outside the pool, and the attention grid is sized for
the longest context the engine allows (short sequences leave the extra splits idle).
"""

from __future__ import annotations

import logging
import time

import torch

from engine.batch import ForwardBatch
from engine.models.decoder import CausalLM
from kernels.metadata import AttentionMetadata

log = logging.getLogger(__name__)

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


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
        device = next(model.parameters()).device
        max_blocks = -(-max_model_len // block_size)
        self.input_ids = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.slot_mapping = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(max_batch, dtype=torch.int32, device=device)
        self.block_tables = torch.full(
            (max_batch, max_blocks), scratch_block, dtype=torch.int32, device=device
        )
        self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}
        self.capture_seconds = 0.0
        self.replays = 0

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

    @torch.inference_mode()
    def capture(self) -> None:
        started = time.perf_counter()
        self.slot_mapping.fill_(self.scratch_block * self.block_size)
        pool = None
        for bucket in sorted(self.buckets, reverse=True):  # the largest first, so the pool fits all
            for _ in range(2):  # compile kernels and settle the allocator before capturing
                self._forward(bucket)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._logits[bucket] = self._forward(bucket)
            pool = graph.pool()
            self._graphs[bucket] = graph
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - started
        log.info("captured %d decode graphs in %.1f s", len(self._graphs), self.capture_seconds)

    def supports(self, batch: ForwardBatch) -> bool:
        metadata = batch.metadata
        return (
            bool(self._graphs)
            and metadata.is_pure_decode
            and metadata.num_seqs <= self.buckets[-1]
            and metadata.block_tables.shape[1] <= self.block_tables.shape[1]
        )

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits [B, vocab] for a pure-decode batch of B sequences."""
        count = batch.metadata.num_seqs
        bucket = next(b for b in self.buckets if b >= count)
        width = batch.metadata.block_tables.shape[1]
        self.input_ids[:count].copy_(batch.input_ids, non_blocking=True)
        self.positions[:count].copy_(batch.positions, non_blocking=True)
        self.slot_mapping[:count].copy_(batch.metadata.slot_mapping, non_blocking=True)
        self.seq_lens[:count].copy_(batch.metadata.seq_lens, non_blocking=True)
        self.block_tables[:count, :width].copy_(batch.metadata.block_tables, non_blocking=True)
        if bucket > count:
            # Padding rows: one token of context in the scratch block, written there too.
            self.input_ids[count:bucket].zero_()
            self.positions[count:bucket].zero_()
            self.slot_mapping[count:bucket].fill_(self.scratch_block * self.block_size)
            self.seq_lens[count:bucket].fill_(1)
            self.block_tables[count:bucket, 0].fill_(self.scratch_block)
        self._graphs[bucket].replay()
        self.replays += 1
        return self._logits[bucket][:count]
