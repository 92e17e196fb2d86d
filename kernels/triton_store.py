"""Triton KV store: write this step's K and V rows into the paged cache at their slots."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_pdl import pdl_prologue, use_pdl


@triton.jit
def _store_kv_kernel(
    key_ptr,
    value_ptr,
    cache_ptr,
    slot_ptr,
    stride_key_token,
    stride_key_head,
    stride_value_token,
    stride_value_head,
    stride_cache_kv,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    num_kv_heads,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS_BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_prologue(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    head_block = tl.program_id(1)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    # A negative slot marks a padding token (CUDA-graph batches): nothing to store.
    if slot < 0:
        return
    heads = head_block * HEADS_BLOCK + tl.arange(0, HEADS_BLOCK)
    dims = tl.arange(0, HEAD_DIM)
    mask = (heads < num_kv_heads)[:, None]
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    dst = (
        cache_ptr
        + block * stride_cache_block
        + offset * stride_cache_slot
        + heads[:, None] * stride_cache_head
        + dims[None, :]
    )
    key = tl.load(
        key_ptr + token * stride_key_token + heads[:, None] * stride_key_head + dims[None, :], mask=mask
    )
    value = tl.load(
        value_ptr + token * stride_value_token + heads[:, None] * stride_value_head + dims[None, :], mask=mask
    )
    tl.store(dst, key.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_cache_kv, value.to(cache_ptr.dtype.element_ty), mask=mask)


def store_kv_triton(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Same contract as kernels.attention_ref.store_kv: key/value [T, kv_heads, head_dim]."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    _, _, block_size, cache_heads, cache_dim = kv_cache.shape
    if (cache_heads, cache_dim) != (num_kv_heads, head_dim) or value.shape != key.shape:
        raise ValueError(f"key {tuple(key.shape)}, value {tuple(value.shape)}, cache {tuple(kv_cache.shape)}")
    if key.stride(-1) != 1 or value.stride(-1) != 1 or kv_cache.stride(-1) != 1:
        raise ValueError("head_dim must be the innermost, contiguous dimension")
    # About 2K elements per program: a whole token for small models, a few heads for large ones.
    heads_block = min(triton.next_power_of_2(num_kv_heads), max(1, 2048 // head_dim))
    grid = (num_tokens, triton.cdiv(num_kv_heads, heads_block))
    pdl = use_pdl(key.device)
    _store_kv_kernel[grid](
        key,
        value,
        kv_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        num_kv_heads,
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        HEADS_BLOCK=heads_block,
        num_warps=4,
        USE_PDL=pdl,
        launch_pdl=pdl,
    )
