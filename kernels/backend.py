"""The attention interface the model calls, and the pure-torch implementation of it."""

from __future__ import annotations

from typing import Protocol

import torch

from kernels.attention_ref import paged_attention_ref, store_kv
from kernels.metadata import AttentionMetadata


class AttentionBackend(Protocol):
    name: str

    def __call__(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """Store this step's key/value in kv_cache, then attend; returns [T, heads, head_dim]."""
        ...


class TorchAttention:
    """Reference attention in plain torch: correct everywhere, fast nowhere."""

    name = "torch"

    def __call__(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        store_kv(key, value, kv_cache, metadata.slot_mapping)
        return paged_attention_ref(query, kv_cache, metadata, scale)


def default_backend(device: torch.device) -> AttentionBackend:
    # The Triton kernels join here once they exist; until then every device uses the reference.
    return TorchAttention()
