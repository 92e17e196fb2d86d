"""The attention interface the model calls, and the pure-torch implementation of it."""

from __future__ import annotations

from typing import Protocol

import torch

from kernels.attention_ref import paged_attention_ref, store_kv
from kernels.metadata import AttentionMetadata


class AttentionBackend(Protocol):
    """Two calls per layer: the store depends only on the token count, so a piecewise CUDA
    graph can capture it; attention's launch depends on the batch's sequences (engine/
    piecewise_graphs.py runs it between the graphs)."""

    name: str

    def store(
        self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        """Write this step's key/value [T, kv_heads, head_dim] to their slots in kv_cache."""
        ...

    def attend(
        self,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of query [T, heads, head_dim] over the stored context; into `out` when given."""
        ...


class TorchAttention:
    """Reference attention in plain torch: correct everywhere, fast nowhere."""

    name = "torch"

    def store(
        self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        store_kv(key, value, kv_cache, slot_mapping)

    def attend(
        self,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        result = paged_attention_ref(query, kv_cache, metadata, scale)
        if out is None:
            return result
        return out.copy_(result)


class TritonAttention:
    """Triton kernels: KV store by slot, then paged decode (split-KV) or extend attention.

    Launch sizes come from the metadata's host mirrors only, so a call never waits on the GPU,
    and lengths are read on the device: a decode step can be captured in a CUDA graph whose
    host mirrors give the longest allowed context (each sequence spreads its own length over
    the splits, so short ones lose nothing).
    """

    name = "triton"
    supports_cuda_graphs = True

    def __init__(self) -> None:
        # Imported here so that CPU-only installs never import triton.
        from kernels.triton_decode import paged_decode_triton
        from kernels.triton_extend_split import extend_attention
        from kernels.triton_store import store_kv_triton

        self._store = store_kv_triton
        self._decode = paged_decode_triton
        self._extend = extend_attention

    def store(
        self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        self._store(key, value, kv_cache, slot_mapping)

    def attend(
        self,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if out is None:
            out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        if metadata.num_seqs == 0:
            return out
        if metadata.is_pure_decode:
            return self._decode(
                query, kv_cache, metadata.block_tables, metadata.seq_lens, metadata.max_seq_len, scale, out
            )
        # Decodes mixed into a prefill batch run here too, as one-token chunks. Short chunks on
        # long contexts split the keys across programs (max_seq_len sizes the splits).
        return self._extend(
            query,
            kv_cache,
            metadata.block_tables,
            metadata.seq_lens,
            metadata.query_start_loc,
            metadata.num_seqs,
            scale,
            out,
            metadata.max_query_len,
            metadata.max_seq_len,
        )


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def default_backend(device: torch.device) -> AttentionBackend:
    """Triton on CUDA when triton imports; the pure-torch reference everywhere else."""
    if torch.device(device).type == "cuda" and triton_available():
        return TritonAttention()
    return TorchAttention()
