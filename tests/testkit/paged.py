"""Drive our model directly over a paged cache, with hand-made block tables."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.batch import SequenceChunk, build_forward_batch
from engine.kv_cache import allocate_kv_caches
from engine.models.decoder import CausalLM


class PagedDriver:
    """Sequences get blocks from a shuffled pool, so block tables are not contiguous."""

    def __init__(self, model: CausalLM, num_blocks: int = 256, block_size: int = 4, seed: int = 0) -> None:
        self.model = model
        self.block_size = block_size
        param = next(model.parameters())
        self.device = param.device
        self.kv = allocate_kv_caches(model.config, num_blocks, block_size, param.dtype, self.device)
        order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        self.free = order
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}

    def step(self, work: Sequence[tuple[int, Sequence[int]]]) -> list[torch.Tensor]:
        """Run one flat batch: (sequence id, new tokens) pairs; returns logits [n, V] per pair."""
        chunks = []
        for seq, tokens in work:
            start = self.lengths.get(seq, 0)
            table = self.tables.setdefault(seq, [])
            while len(table) * self.block_size < start + len(tokens):
                table.append(self.free.pop())
            chunks.append(SequenceChunk(list(tokens), start, list(table)))
            self.lengths[seq] = start + len(tokens)
        batch = build_forward_batch(chunks, self.block_size, self.device)
        with torch.no_grad():
            hidden = self.model(batch.input_ids, batch.positions, self.kv, batch.metadata)
            logits = self.model.compute_logits(hidden)
        out, start = [], 0
        for _, tokens in work:
            out.append(logits[start : start + len(tokens)])
            start += len(tokens)
        return out
