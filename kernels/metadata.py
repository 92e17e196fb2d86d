"""What an attention kernel needs to know about one flat batch of sequences."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    """A flat batch: sequence i owns new tokens query_start_loc[i]:query_start_loc[i+1].

    Its context is seq_lens[i] tokens: the first seq_lens[i] - query_len already sit in the
    paged cache (a cached prefix or earlier chunks), the last query_len are this step's new
    tokens, written to the cache by slot_mapping before attention runs. Token t of the flat
    batch lives at slot slot_mapping[t] = block * block_size + offset.

    The *_host lists mirror the device tensors so that CPU code never syncs to read them.
    """

    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, max_blocks] int32
    slot_mapping: torch.Tensor  # [T] int64
    query_lens_host: tuple[int, ...]
    seq_lens_host: tuple[int, ...]
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens_host, default=0)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_host, default=0)

    @property
    def is_pure_decode(self) -> bool:
        return self.max_query_len == 1
