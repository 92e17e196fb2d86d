"""Greedy argmax over a vocabulary row, spread over the GPU.

torch's argmax gives one row to one block: at batch 1 a 128,256-token row took 27.6 us on an
H200, more than any per-layer kernel but the matmuls. Here each row is cut into chunks, a
program finds each chunk's maximum and its first index, and a second kernel picks the best
chunk: ~126 programs at once instead of one.

Ties go to the lowest index, as torch's argmax documents. A NaN counts as -inf (torch would pick
it); the logits of a working model hold none, and a broken one still gets a valid index.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_pdl import pdl_prologue, use_pdl

# Columns per program of the first pass: 126 programs for a 128k vocabulary at batch 1.
CHUNK = 1024
NO_INDEX = 2**31 - 1
# Kernels may read only constexpr globals (the interpreter accepts any; the compiler does not).
_NO_INDEX = tl.constexpr(NO_INDEX)


@triton.jit
def _chunk_argmax_kernel(
    x_ptr, values_ptr, indices_ptr, n_cols, stride_x, num_chunks,
    CHUNK: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    pdl_prologue(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(x_ptr + row * stride_x + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("-inf"), x)  # NaN counts as -inf, so a column always matches
    best = tl.max(x, axis=0)
    # The first column holding the maximum; a chunk of -inf gives its first column (torch's
    # answer for an all -inf row is index 0).
    first = tl.min(tl.where(x == best, cols, _NO_INDEX), axis=0)
    tl.store(values_ptr + row * num_chunks + chunk, best)
    tl.store(indices_ptr + row * num_chunks + chunk, first)


@triton.jit
def _best_chunk_kernel(
    values_ptr, indices_ptr, out_ptr, num_chunks, BLOCK: tl.constexpr, USE_PDL: tl.constexpr
):  # fmt: skip
    pdl_prologue(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    chunks = tl.arange(0, BLOCK)
    mask = chunks < num_chunks
    values = tl.load(values_ptr + row * num_chunks + chunks, mask=mask, other=float("-inf"))
    indices = tl.load(indices_ptr + row * num_chunks + chunks, mask=mask, other=_NO_INDEX)
    best = tl.max(values, axis=0)
    # Chunks are in column order, so the lowest index among the best chunks is the first.
    tl.store(out_ptr + row, tl.min(tl.where(values == best, indices, _NO_INDEX), axis=0).to(tl.int64))


def argmax_triton(logits: torch.Tensor) -> torch.Tensor:
    """Index of each row's maximum, int64 [rows], like `logits.argmax(dim=-1)` on a 2-D tensor."""
    if logits.dim() != 2:
        raise ValueError(f"argmax_triton takes [rows, columns], got {tuple(logits.shape)}")
    rows, n_cols = logits.shape
    if n_cols == 0 or n_cols >= NO_INDEX:
        raise ValueError(f"argmax_triton needs 1 to {NO_INDEX - 1} columns, got {n_cols}")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out
    num_chunks = triton.cdiv(n_cols, CHUNK)
    values = torch.empty((rows, num_chunks), dtype=torch.float32, device=logits.device)
    indices = torch.empty((rows, num_chunks), dtype=torch.int32, device=logits.device)
    pdl = use_pdl(logits.device)
    _chunk_argmax_kernel[(rows, num_chunks)](
        logits, values, indices, n_cols, logits.stride(0), num_chunks,
        CHUNK=CHUNK, USE_PDL=pdl, num_warps=4, launch_pdl=pdl,
    )  # fmt: skip
    _best_chunk_kernel[(rows,)](
        values, indices, out, num_chunks, BLOCK=triton.next_power_of_2(num_chunks), USE_PDL=pdl,
        num_warps=4, launch_pdl=pdl,
    )  # fmt: skip
    return out
