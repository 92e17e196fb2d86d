"""The paged KV cache: one preallocated tensor per layer, sized in blocks."""

from __future__ import annotations

import torch

from engine.model_config import ModelConfig


def allocate_kv_caches(
    config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    """Per layer a [2, num_blocks, block_size, kv_heads, head_dim] tensor (K then V).

    Left uninitialised: attention reads a slot only after this step or an earlier one wrote
    it, and zeroing a pool of gigabytes costs seconds at start.
    """
    shape = (2, num_blocks, block_size, config.num_kv_heads, config.head_dim)
    return [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]


def kv_cache_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return config.kv_bytes_per_token * block_size * element


def blocks_for_memory(config: ModelConfig, block_size: int, dtype: torch.dtype, budget_bytes: int) -> int:
    return max(0, budget_bytes // kv_cache_bytes_per_block(config, block_size, dtype))
