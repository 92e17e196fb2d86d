"""Host-side helpers shared by the Triton attention kernels (no kernels here)."""

from __future__ import annotations

import functools
import math

import torch

LOG2E = 1.4426950408889634


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Multiprocessors of the device; 132 (an H100) for the CPU interpreter."""
    if device.type != "cuda":
        return 132
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _num_sms(index)


@functools.cache
def _shared_memory_optin(device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    return int(getattr(props, "shared_memory_per_block_optin", 0))


def shared_memory_per_program(device: torch.device) -> int:
    """Shared memory one program may claim (opt-in); 227 KiB (Hopper) for the CPU interpreter."""
    if device.type != "cuda":
        return 227 << 10
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _shared_memory_optin(index)


def dot_precision(dtype: torch.dtype) -> str:
    # float32 is the oracle dtype: keep its dots in full precision rather than tf32, so that
    # fp32 engines give the reference's greedy tokens.
    return "ieee" if dtype == torch.float32 else "tf32"


def check_attention_shapes(query: torch.Tensor, kv_cache: torch.Tensor) -> tuple[int, int, int, int]:
    """(num_heads, num_kv_heads, head_dim, block_size), after checking what the kernels assume."""
    _, num_heads, head_dim = query.shape
    _, _, block_size, num_kv_heads, cache_dim = kv_cache.shape
    if cache_dim != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"query {tuple(query.shape)} does not fit cache {tuple(kv_cache.shape)}")
    if head_dim < 16 or head_dim > 256 or not _is_power_of_two(head_dim):
        raise ValueError(f"head_dim {head_dim}: the Triton kernels need a power of two in 16..256")
    if query.stride(-1) != 1 or kv_cache.stride(-1) != 1:
        raise ValueError("head_dim must be the innermost, contiguous dimension")
    return num_heads, num_kv_heads, head_dim, block_size


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def next_power_of_two(value: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, value))))
