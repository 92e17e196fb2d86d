"""kernels/future_tokens.py's swap of placeholder ids for sampled ones, in one launch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


# n is not specialised: 1, a multiple of 16 and anything else would each compile a variant,
# in the middle of serving (~65 ms each on an H200).
@triton.jit(do_not_specialize=["n"])
def _resolve_kernel(ids_ptr, future_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    ids = tl.load(ids_ptr + offsets, mask=inside, other=0)
    placeholder = ids < 0
    sampled = tl.load(future_ptr + (-1 - ids), mask=inside & placeholder, other=0)
    tl.store(ids_ptr + offsets, tl.where(placeholder, sampled, ids), mask=inside & placeholder)


def resolve_triton(ids: torch.Tensor, future: torch.Tensor) -> None:
    """In place: ids[i] = future[-1 - ids[i]] where ids[i] < 0 (ids contiguous, int64)."""
    n = ids.numel()
    if n:
        _resolve_kernel[(triton.cdiv(n, BLOCK),)](ids, future, n, BLOCK=BLOCK)
