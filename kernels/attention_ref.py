"""Pure-torch paged attention: the CPU path and the oracle for the GPU kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.metadata import AttentionMetadata


def store_kv(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write this step's K/V ([T, kv_heads, head_dim]) into the paged cache at their slots.

    kv_cache is [2, num_blocks, block_size, kv_heads, head_dim]; viewing the block and offset
    dimensions as one makes a slot a plain row index.
    """
    _, num_blocks, block_size, kv_heads, head_dim = kv_cache.shape
    slots = kv_cache.view(2, num_blocks * block_size, kv_heads, head_dim)
    slots[0].index_copy_(0, slot_mapping, key.to(kv_cache.dtype))
    slots[1].index_copy_(0, slot_mapping, value.to(kv_cache.dtype))


def gather_context(
    kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one sequence's first seq_len tokens, [seq_len, kv_heads, head_dim] each."""
    block_size = kv_cache.shape[2]
    num_blocks = -(-seq_len // block_size)
    # index_select, not kv_cache[0, blocks]: mixed basic/advanced indexing costs milliseconds.
    context = kv_cache.index_select(1, block_table[:num_blocks].long()).flatten(1, 2)[:, :seq_len]
    return context[0], context[1]


def paged_attention_ref(
    query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its whole paged context.

    query is [T, heads, head_dim]; the K/V of the new tokens must already be stored. New token
    j of a sequence with context L and q new tokens sits at position L - q + j and sees keys
    at positions 0 .. L - q + j. Grouped KV heads are shared by heads // kv_heads query heads.
    """
    out = torch.empty_like(query)
    start = 0
    for i, (query_len, seq_len) in enumerate(
        zip(metadata.query_lens_host, metadata.seq_lens_host, strict=True)
    ):
        keys, values = gather_context(kv_cache, metadata.block_tables[i], seq_len)
        q = query[start : start + query_len].transpose(0, 1).unsqueeze(0)  # [1, H, q, D]
        k = keys.transpose(0, 1).unsqueeze(0).to(query.dtype)  # [1, KVH, L, D]
        v = values.transpose(0, 1).unsqueeze(0).to(query.dtype)
        key_pos = torch.arange(seq_len, device=query.device)
        query_pos = torch.arange(seq_len - query_len, seq_len, device=query.device)
        mask = key_pos[None, :] <= query_pos[:, None]
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[start : start + query_len] = attended[0].transpose(0, 1)
        start += query_len
    return out
