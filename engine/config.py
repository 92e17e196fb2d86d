"""The engine's one configuration object, frozen at start."""

from __future__ import annotations

from dataclasses import dataclass

import torch

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: str = "default"
    dtype: str = "auto"  # bfloat16 on GPU, float32 on CPU
    device: str = "auto"  # cuda when available
    block_size: int = 16
    # KV pool size: an explicit block count, else a share of free GPU memory, else (CPU) a size.
    num_blocks: int | None = None
    gpu_memory_fraction: float = 0.85
    cpu_kv_cache_gib: float = 1.0
    max_num_seqs: int = 64
    max_batched_tokens: int = 2048
    max_model_len: int | None = None  # default: the model's, capped by the pool
    enable_prefix_caching: bool = True
    queue_policy: str = "fcfs"
    eviction_policy: str = "lru"
    seed: int = 0
    cuda_graphs: bool = True  # decode steps replayed from CUDA graphs (GPU with the Triton backend)
    # With cuda_graphs: other steps up to 2,048 tokens as graph pieces between eager attention
    # calls (engine/piecewise_graphs.py).
    piecewise_graphs: bool = True
    # Plan and launch step N+1 while step N runs (default: on a GPU, off on a CPU).
    overlap_scheduling: bool | None = None
    # Matmuls of <= 16 rows through a GEMV kernel for the weight shapes where it measured
    # faster than cuBLAS at start (engine/skinny.py; GPU, bf16/fp16 only).
    skinny_matmuls: bool = True
    # "safetensors": the folder's weights; "dummy": random weights of the folder's config.json
    # shape (vLLM's --load-format dummy), for serving benchmarks of real shapes without a download.
    load_format: str = "safetensors"

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be positive, got {self.num_blocks}")
        if self.max_num_seqs < 1 or self.max_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_batched_tokens must be positive")
        if not 0.0 < self.gpu_memory_fraction < 1.0:
            raise ValueError(f"gpu_memory_fraction must be in (0, 1), got {self.gpu_memory_fraction}")
        if self.load_format not in ("safetensors", "dummy"):
            raise ValueError(f"load_format must be safetensors or dummy, got {self.load_format!r}")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(_DTYPES)}, got {self.dtype!r}")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return _DTYPES[self.dtype]
